"""A training run's settings, validated before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from stages.basics.defaults import DEFAULT_HOOK
from stages.basics.errors import require

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

        require(self.arch in ARCHITECTURES, f"unknown --arch {self.arch!r}; available: {', '.join(ARCHITECTURES)}")
        require(self.width > 0, f"--width must be positive, got {self.width}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, owners in ARCH_SPECIFIC.items():
            require(
                getattr(self, name) == defaults[name] or self.arch in owners,
                f"--{name.replace('_', '-')} does not apply to --arch {self.arch} (it is for {', '.join(owners)})",
            )
        ARCHITECTURES[self.arch].check_config(self)
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(
            self.tokens >= self.batch_size,
            f"--tokens ({self.tokens:,}) must be at least one batch ({self.batch_size:,})",
        )
        require(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(
            self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}"
        )
        require(
            0 <= self.warmup_frac < 1 and 0 <= self.decay_frac < 1 and self.warmup_frac + self.decay_frac <= 1,
            "warm-up and decay fractions must be in [0, 1) and sum to at most 1",
        )
        require(
            self.aux_k is None or 1 <= self.aux_k <= self.width,
            f"--aux-k must be in [1, width={self.width}], got {self.aux_k}",
        )
        require(self.aux_coef >= 0, f"--aux-coef must be >= 0 (0 turns AuxK off), got {self.aux_coef}")
        require(
            self.dead_window_tokens is None or self.dead_window_tokens > 0,
            f"--dead-window must be a positive number of tokens, got {self.dead_window_tokens}",
        )
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(
            self.log_every > 0 and self.checkpoint_every > 0,
            f"--log-every and --checkpoint-every must be positive step counts, got {self.log_every} "
            f"and {self.checkpoint_every}",
        )
        require(not (self.overwrite and self.resume), "--overwrite and --resume exclude each other: pick one")
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
