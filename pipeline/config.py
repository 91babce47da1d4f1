"""Configuration of each stage as dataclasses, validated before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from stages.basics.errors import SaepipeError
from store_schema.normalization import MODES as NORMALIZATION_MODES

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATASET = "python-docs"
DEFAULT_HOOK = "blocks.15.hook_resid_post"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SaepipeError(message)


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
        _require(len(self.hooks) > 0, "give at least one --hook")
        _require(len(set(self.hooks)) == len(self.hooks), "a --hook is given twice; name each hook once")
        _require(self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        _require(self.context_size >= 2, f"--context-size must be at least 2, got {self.context_size}")
        _require(
            0 <= self.drop_first < self.context_size,
            f"--drop-first must be in [0, context size), got {self.drop_first}",
        )
        _require(0 <= self.eval_fraction < 0.5, f"--eval-fraction must be in [0, 0.5), got {self.eval_fraction}")
        _require(
            self.normalize in NORMALIZATION_MODES,
            f"--normalize must be one of {', '.join(NORMALIZATION_MODES)}, got {self.normalize!r}",
        )
        _require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        _require(
            self.chunk_rows > 0 and self.shuffle_buffer_rows > 0 and self.warmup_rows > 0,
            "--chunk-rows, --shuffle-buffer-rows and --warmup-rows must be positive",
        )
        _require(
            self.outlier_factor is None or self.outlier_factor > 1,
            f"--outlier-factor must be above 1 (or 0 to keep every row), got {self.outlier_factor}",
        )
        _require(self.nonfinite in ("skip", "abort"), f"--nonfinite must be skip or abort, got {self.nonfinite!r}")
        _require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        _require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}",
        )
        _require(not (self.overwrite and self.resume), "--overwrite and --resume exclude each other: pick one")
        _require(
            self.workers is None or self.scheduler is None,
            "--workers and --scheduler exclude each other: --workers N starts a local cluster, "
            "--scheduler ADDRESS uses a running one; pick one",
        )
        _require(self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        _require(
            self.scheduler is None or bool(self.scheduler.strip()),
            "--scheduler needs the dask scheduler's address, like tcp://HOST:8786",
        )
        _require(
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


TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")

# Settings that belong to some architectures only; giving one to another architecture is an error.
ARCH_SPECIFIC = {
    "k": TOPK_FAMILY + ("mp",),
    "aux_k": TOPK_FAMILY,
    "aux_coef": TOPK_FAMILY,
    "l1_coef": ("relu",),
    "l1_warmup_frac": ("relu",),
    "ghost_grads": ("relu",),
    "bandwidth": ("jumprelu",),
    "init_threshold": ("jumprelu",),
    "l0_coef": ("jumprelu",),
    "target_l0": ("jumprelu",),
    "groups": ("matryoshka",),
    "residual_threshold": ("mp",),
    "max_iterations": ("mp",),
}


@dataclass
class TrainConfig:
    store: str
    out: str
    hook: str = DEFAULT_HOOK
    arch: str = "topk"
    width: int = 4096
    k: int | None = None  # TopK family and mp: active latents per token (None: 32); others: must stay None
    tokens: int = 1_000_000
    batch_size: int = 4096
    lr: float | None = None  # None: the TopK paper's 2e-4 / sqrt(width / 2**14)
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    # Clip the gradient's global norm, measured as the gradient of the summed squared error (SAELens's
    # loss units and its default of 1). Short runs gain most: Adam's second moment otherwise remembers
    # the large early gradients and damps every later step. 0 turns clipping off.
    max_grad_norm: float = 1.0
    aux_k: int | None = None  # None: d_in // 2
    aux_coef: float = 1 / 32
    dead_window_tokens: int | None = None  # None: min(10M, tokens // 4)
    geometric_median_rows: int = 8192
    # ReLU + L1
    l1_coef: float | None = None
    l1_warmup_frac: float = 0.05
    ghost_grads: bool = False
    # JumpReLU
    bandwidth: float | None = None  # None: 0.001·√d_in (the paper's value in our input units)
    init_threshold: float | None = None  # None: d_in / d_sae (one std of the initial pre-activations)
    l0_coef: float | None = None
    target_l0: float | None = None
    # Matryoshka: increasing prefix sizes ending at width
    groups: tuple[int, ...] | None = None
    # Matching pursuit, dynamic variant (static when both are None)
    residual_threshold: float | None = None
    max_iterations: int | None = None
    device: str = "auto"
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200
    resident: bool | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        from stages.saes import ARCHITECTURES  # here, not at the top: the CLI starts without torch

        _require(self.arch in ARCHITECTURES, f"unknown --arch {self.arch!r}; available: {', '.join(ARCHITECTURES)}")
        _require(self.width > 0, f"--width must be positive, got {self.width}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, owners in ARCH_SPECIFIC.items():
            _require(
                getattr(self, name) == defaults[name] or self.arch in owners,
                f"--{name.replace('_', '-')} does not apply to --arch {self.arch} (it is for {', '.join(owners)})",
            )
        ARCHITECTURES[self.arch].check_config(self)
        _require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        _require(
            self.tokens >= self.batch_size,
            f"--tokens ({self.tokens:,}) must be at least one batch ({self.batch_size:,})",
        )
        _require(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        _require(
            self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}"
        )
        _require(
            0 <= self.warmup_frac < 1 and 0 <= self.decay_frac < 1 and self.warmup_frac + self.decay_frac <= 1,
            "warm-up and decay fractions must be in [0, 1) and sum to at most 1",
        )
        _require(
            self.aux_k is None or 1 <= self.aux_k <= self.width,
            f"--aux-k must be in [1, width={self.width}], got {self.aux_k}",
        )
        _require(self.aux_coef >= 0, f"--aux-coef must be >= 0 (0 turns AuxK off), got {self.aux_coef}")
        _require(
            self.dead_window_tokens is None or self.dead_window_tokens > 0,
            f"--dead-window must be a positive number of tokens, got {self.dead_window_tokens}",
        )
        _require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        _require(
            self.log_every > 0 and self.checkpoint_every > 0,
            f"--log-every and --checkpoint-every must be positive step counts, got {self.log_every} "
            f"and {self.checkpoint_every}",
        )
        _require(not (self.overwrite and self.resume), "--overwrite and --resume exclude each other: pick one")
        return self

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / (self.width / 2**14) ** 0.5

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr"] = self.resolved_lr()
        for key in ("overwrite", "resume", "progress"):
            d.pop(key)
        return d
