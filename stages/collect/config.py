"""A collect's settings, validated before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from stages.basics.defaults import DEFAULT_DATASET, DEFAULT_HOOK, DEFAULT_MODEL
from stages.basics.errors import require
from stages.basics.settings import device_setting, progress_setting, setting
from stages.host_model.model import expand_hook_ranges
from store_schema.normalization import MODES as NORMALIZATION_MODES

# Where and how a collect runs, never what it writes: the other fields decide the store's bytes.
RUN_SETTINGS = frozenset(
    {
        "out", "device", "overwrite", "resume", "fsync", "progress", "workers", "scheduler", "append", "mirrored",
        "shard_chunks",  # the files the rows are kept in, not the rows: a store resumes with its own
    }
)  # fmt: skip
# Chunks per shard file of a new store's row arrays: a 1B-token store in thousands of files, not hundreds
# of thousands; a shard (151 MB at d 576 with 8,192-row chunks) is what a collect holds back per hook.
DEFAULT_SHARD_CHUNKS = 16


@dataclass
class CollectConfig:
    out: str = setting(help="the store folder to write (STORE.zarr)")
    model: str = setting(
        DEFAULT_MODEL,
        "smollm2-135m (offline), an HF id, a local HF model folder, synthetic (scale tests) or null-d<N> (no forward work: collect's own ceiling)",
    )
    dataset: str = setting(
        DEFAULT_DATASET,
        "python-docs (offline), synthetic-text (scale tests), an HF dataset name, or local "
        ".txt/.jsonl/.parquet files (comma list or glob)",
    )
    dataset_split: str = setting("train", "dataset split (HF datasets)", flag="--split")
    text_column: str = setting("text", "the column holding the text (HF datasets, .jsonl, .parquet)")
    hooks: tuple[str, ...] = setting((DEFAULT_HOOK,), "hook point; repeat for several", flag="--hook")
    tokens: int = setting(100_000, "training rows (tokens) to collect; eval rows come on top")
    context_size: int = setting(128, "tokens per context, BOS included")
    normalize: str = setting(
        "center-scale", "how rows are normalized before fp16 (store_schema/SPEC.md)", choices=NORMALIZATION_MODES
    )
    eval_fraction: float = setting(0.05, "share of contexts held out for eval")
    batch_size: int = setting(16, "contexts per forward pass")
    device: str = device_setting()
    dtype: str = setting("float32", "the host model's dtype", choices=("float32", "bfloat16", "float16"))
    seed: int = setting(0, "seed of the eval split and the shuffle")
    drop_first: int = setting(1, "positions [0, N) are not stored (0 is an attention sink)")
    exclude_special: bool = setting(
        True,
        "also store rows at BOS/separator tokens inside contexts (attention sinks; left out by default)",
        flag="--keep-special",
        inverted=True,
    )
    outlier_factor: float | None = setting(
        10.0, "leave out rows whose norm exceeds this many times the median (massive activations); 0 keeps all"
    )
    shuffle_buffer_rows: int = setting(65_536, "rows shuffled together before writing")
    chunk_rows: int = setting(8_192, "rows per Zarr chunk")
    shard_chunks: int | None = setting(
        None,
        "chunks per Zarr shard (file) of a new store's rows; 1 keeps a file per chunk (a store resumes with its own)",
        shown_default=f"{DEFAULT_SHARD_CHUNKS}; 1 with --workers or --scheduler",
        metavar="N",
    )
    warmup_rows: int = setting(65_536, "rows the normalization is estimated from")
    nonfinite: str = setting(
        "skip", "contexts with NaN/inf activations: leave them out (counted) or stop", choices=("skip", "abort")
    )
    overwrite: bool = setting(False, "replace whatever --out holds")
    resume: bool = setting(False, "continue an interrupted collect (also done by re-running it)")
    fsync: bool = setting(
        True,
        "do not flush each commit to disk (faster; a power cut can then damage the store: scratch stores only)",
        flag="--no-fsync",
        inverted=True,
    )
    progress: bool = progress_setting()
    # Where the forward passes run (never part of the store's contents): this process, a local dask
    # cluster of `workers` processes, or the dask cluster whose scheduler is at `scheduler`.
    workers: int | None = setting(
        None, "run the model on a local dask cluster of N worker processes (e.g. one per GPU)"
    )
    scheduler: str | None = setting(
        None,
        "run the model on the workers of a running dask cluster (tcp://HOST:PORT); --out must be on a "
        "filesystem they all see",
        metavar="ADDRESS",
    )
    append: bool = False  # `out` is a complete store to grow to `tokens` training tokens, with its own settings
    mirrored: bool = False  # `out` stages a collect to S3: its chunks leave it as they are uploaded

    def __post_init__(self) -> None:
        self.hooks = tuple(expand_hook_ranges(self.hooks))  # blocks.{0-29}.hook_mlp_out: one name per layer
        if self.outlier_factor == 0:  # 0 keeps every row, as None does
            self.outlier_factor = None
        if self.shard_chunks is None:
            self.shard_chunks = 1 if self.distributed else DEFAULT_SHARD_CHUNKS

    def validate(self) -> CollectConfig:
        require(len(self.hooks) > 0, "give at least one --hook")
        require(len(set(self.hooks)) == len(self.hooks), "a --hook is given twice; name each hook once")
        require(self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        require(self.context_size >= 2, f"--context-size must be at least 2, got {self.context_size}")
        require(
            0 <= self.drop_first < self.context_size,
            f"--drop-first must be in [0, context size), got {self.drop_first}",
        )
        require(0 <= self.eval_fraction < 0.5, f"--eval-fraction must be in [0, 0.5), got {self.eval_fraction}")
        require(
            self.normalize in NORMALIZATION_MODES,
            f"--normalize must be one of {', '.join(NORMALIZATION_MODES)}, got {self.normalize!r}",
        )
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(
            self.chunk_rows > 0 and self.shuffle_buffer_rows > 0 and self.warmup_rows > 0,
            "--chunk-rows, --shuffle-buffer-rows and --warmup-rows must be positive",
        )
        require(
            self.outlier_factor is None or self.outlier_factor > 1,
            f"--outlier-factor must be above 1 (or 0 to keep every row), got {self.outlier_factor}",
        )
        require(self.shard_chunks >= 1, f"--shard-chunks must be at least 1, got {self.shard_chunks}")
        require(
            self.shard_chunks == 1 or not self.distributed,
            f"--shard-chunks {self.shard_chunks} with --workers/--scheduler: dask workers write chunks of "
            "one shard side by side; drop --shard-chunks (a file per chunk) or collect in one process",
        )
        require(self.nonfinite in ("skip", "abort"), f"--nonfinite must be skip or abort, got {self.nonfinite!r}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}",
        )
        require(not (self.overwrite and self.resume), "--overwrite and --resume exclude each other: pick one")
        require(
            self.workers is None or self.scheduler is None,
            "--workers and --scheduler exclude each other: --workers N starts a local cluster, "
            "--scheduler ADDRESS uses a running one; pick one",
        )
        require(self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        require(
            self.scheduler is None or bool(self.scheduler.strip()),
            "--scheduler needs the dask scheduler's address, like tcp://HOST:8786",
        )
        require(
            not (self.append and (self.overwrite or self.resume)),
            "--append resumes an interrupted append by itself and never overwrites: drop --resume/--overwrite",
        )
        return self

    @property
    def distributed(self) -> bool:
        """Whether the forward passes run on dask workers."""
        return self.workers is not None or self.scheduler is not None

    @property
    def rows_per_context(self) -> int:
        return self.context_size - self.drop_first

    def content_fields(self) -> dict:
        """The fields that decide the store's bytes: equal fields mean a resumable, identical store."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_SETTINGS}
        fields["hooks"] = sorted(self.hooks)
        return fields
