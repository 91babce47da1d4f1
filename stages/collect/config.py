"""A collect's settings, validated before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from stages.basics.defaults import DEFAULT_DATASET, DEFAULT_HOOK, DEFAULT_MODEL
from stages.basics.errors import require
from store_schema.normalization import MODES as NORMALIZATION_MODES


@dataclass
class CollectConfig:
    out: str
    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    dataset_split: str = "train"
    text_column: str = "text"
    hooks: tuple[str, ...] = (DEFAULT_HOOK,)
    tokens: int = 100_000
    context_size: int = 128
    normalize: str = "center-scale"
    eval_fraction: float = 0.05
    batch_size: int = 16  # contexts per forward pass
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    drop_first: int = 1  # positions [0, drop_first) are not stored: position 0 is an attention sink
    exclude_special: bool = True  # BOS/separator tokens inside contexts are sinks too: not stored
    outlier_factor: float | None = 10.0  # rows with raw norm > factor x median are not stored; None keeps all
    shuffle_buffer_rows: int = 65_536
    chunk_rows: int = 8_192
    warmup_rows: int = 65_536
    nonfinite: str = "skip"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    # Where the forward passes run (never part of the store's contents): this process, a local dask
    # cluster of `workers` processes, or the dask cluster whose scheduler is at `scheduler`.
    workers: int | None = None
    scheduler: str | None = None
    append: bool = False  # `out` is a complete store to grow to `tokens` training tokens, with its own settings

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
        skip = {"out", "device", "overwrite", "resume", "progress", "workers", "scheduler", "append"}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        fields["hooks"] = sorted(self.hooks)
        return fields
