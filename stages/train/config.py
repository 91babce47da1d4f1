"""A training run's settings, validated before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from stages.basics.errors import SaepipeError, require
from stages.basics.settings import default_of, device_setting, progress_setting, setting
from stages.saes import (
    ARCHITECTURES,
    MULTI_HOOK_ARCHS,
    ArchSettings,
    SparseAutoencoder,
    arch_settings,
    require_arch,
    sae_class,
    settings_arch,
    settings_for,
)
from stages.saes.io import HookArgs, HookIO


@dataclass
class TrainConfig:
    store: str  # the store to train from: a path or URL
    out: str = setting(help="run folder to write")
    hook: str | None = setting(
        None, "the store's hook to train on (repeated for --arch crosscoder)", shown_default="the store's only hook"
    )
    arch: str = setting("topk", f"SAE architecture: {', '.join((*ARCHITECTURES, *MULTI_HOOK_ARCHS))}")
    # Transcoders read one hook and reconstruct another, with one SAE architecture's sparsity rule.
    in_hook: str | None = setting(None, "a transcoder's input hook (e.g. blocks.5.mlp.hook_in)")
    out_hook: str | None = setting(None, "a transcoder's output hook (e.g. blocks.5.hook_mlp_out)")
    # A cross-layer transcoder reads blocks.L.mlp.hook_in and writes blocks.L.hook_mlp_out for L in a range.
    layers: str | None = setting(None, "a cross-layer transcoder's layers, first-last (e.g. 0-29)", metavar="A-B")
    activation: str = setting(
        "topk",
        "the sparsity rule of a transcoder or crosscoder: topk, batchtopk, jumprelu, relu (a clt: topk, batchtopk)",
    )
    # A crosscoder's hooks (the CLI's --hook given several times); `hook` is then None.
    hooks: tuple[str, ...] = ()
    width: int = setting(4096, "number of latents (d_sae)")
    # The architecture's own settings (k, l1_coef, ...), declared beside it in stages/saes/; None: its defaults
    arch_settings: ArchSettings | None = None
    tokens: int = setting(1_000_000, "training tokens (epochs repeat when above the store)")
    batch_size: int = setting(4096, "rows per training step")
    lr: float | None = setting(None, "learning rate", shown_default="2e-4 / sqrt(width / 2^14) (TopK paper)")
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    # Clip the gradient's global norm, measured as the gradient of the summed squared error (SAELens's
    # loss units and its default of 1). Short runs gain most: Adam's second moment otherwise remembers
    # the large early gradients and damps every later step. 0 turns clipping off.
    max_grad_norm: float = setting(
        1.0, "clip the gradient norm (in summed-squared-error units, as SAELens); 0: no clipping"
    )
    dead_window_tokens: int | None = setting(
        None,
        "tokens without firing before a latent counts as dead",
        flag="--dead-window",
        shown_default="min(10M, tokens / 4)",
    )
    geometric_median_rows: int = 8192
    device: str = device_setting()
    seed: int = setting(0, "seed of the initialization and of the batch order")
    log_every: int = setting(20, "steps between training-log lines")
    checkpoint_every: int = setting(200, "steps between checkpoints")
    resident: bool | None = None  # None: hold the split in device memory when it fits (store_schema.loader)
    overwrite: bool = setting(False, "replace the run folder")
    resume: bool = setting(False, "continue from the run folder's checkpoint")
    progress: bool = progress_setting()
    # Experiment tracking (stages/basics/tracking.py). Not part of the run's identity: to_json leaves it
    # out of cfg.json and the checkpoint, so a --resume may add, drop or change it without being refused.
    wandb: str | None = setting(
        None, "log the training to this Weights & Biases project (needs saepipe[wandb])", metavar="PROJECT"
    )
    wandb_run: str | None = setting(None, "the wandb run's name", shown_default="the run folder's name", metavar="NAME")

    @classmethod
    def from_flat(cls, **values) -> TrainConfig:
        """A config from flat values, as the CLI, a sweep and cfg.json name them: the architecture's own
        settings (k, l1_coef, ...) are routed into its ArchSettings, and another architecture's setting
        is refused unless it is left at its default."""
        own = {f.name for f in dataclasses.fields(cls)} - {"arch_settings"}
        named, activation = values.get("arch", "topk"), values.get("activation", "topk")
        arch = settings_arch(named, activation)
        shown = f"{named} --activation {activation}" if arch != named else None
        settings = settings_for(arch, {k: v for k, v in values.items() if k not in own}, shown)
        return cls(**{k: v for k, v in values.items() if k in own}, arch_settings=settings)

    @property
    def settings_arch(self) -> str:
        """The architecture whose settings this run takes (a transcoder's activation)."""
        return settings_arch(self.arch, self.activation)

    @property
    def sae_class(self) -> type[SparseAutoencoder]:
        """The module class the run trains (its architecture, made for its activation)."""
        return sae_class(self.arch, self.activation)

    @property
    def transcodes(self) -> bool:
        """Whether the run writes other hooks than it reads (a transcoder, or a CLT)."""
        return self.sae_class.transcodes

    @property
    def hook_args(self) -> HookArgs:
        """The run's hook options (refusing a malformed --layers)."""
        layers = self.layer_range if self.layers is not None else None
        return HookArgs(self.hook, tuple(self.hooks or ()), self.in_hook, self.out_hook, layers)

    @property
    def io(self) -> HookIO:
        """The store hooks the run encodes and reconstructs, as its architecture reads its hook options."""
        return self.sae_class.hook_io(self.hook_args)

    @property
    def layer_range(self) -> range:
        """A CLT's layers, from --layers A-B."""
        first, sep, last = (self.layers or "").partition("-")
        try:
            layers = range(int(first), int(last if sep else first) + 1)
        except ValueError:
            layers = range(0)
        if not layers or layers.start < 0:
            raise SaepipeError(f"--layers must be first-last with 0 <= first <= last (e.g. 0-29), got {self.layers!r}")
        return layers

    @property
    def in_hooks(self) -> tuple[str, ...]:
        """The hooks the run encodes."""
        return self.io.reads

    @property
    def out_hooks(self) -> tuple[str, ...]:
        """The hooks the run reconstructs."""
        return self.io.writes

    @property
    def read_hooks(self) -> tuple[str, ...]:
        """The store's hooks a training batch holds, side by side: the hooks encoded, then those written
        when they are others."""
        return self.io.batch_hooks

    @property
    def settings(self) -> ArchSettings:
        """The architecture's settings: as given, or its defaults."""
        return self.arch_settings if self.arch_settings is not None else settings_for(self.settings_arch, {})

    def flat(self) -> dict:
        """Every field, with every architecture's settings flattened in (another's at its default):
        what from_flat takes back."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "arch_settings"}
        own = dataclasses.asdict(self.settings)
        for name, field in arch_settings().items():
            values[name] = own[name] if name in own else default_of(field)
        return values

    def replaced(self, **changes) -> TrainConfig:
        """A copy with `changes`, architecture settings included (e.g. k=16)."""
        return TrainConfig.from_flat(**{**self.flat(), **changes})

    def validate(self) -> TrainConfig:
        self._validate_hooks()
        expected = require_arch(self.settings_arch).settings_class
        require(
            type(self.settings) is expected,
            f"--arch {self.arch} takes {expected.__name__}, not {type(self.settings).__name__}",
        )
        require(self.width > 0, f"--width must be positive, got {self.width}")
        self.settings.check(self.width)
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

    def _validate_hooks(self) -> None:
        """The hook options an architecture takes, and only those."""
        if self.arch in MULTI_HOOK_ARCHS:
            settings_arch(self.arch, self.activation)  # refuses an activation the architecture cannot take
        else:
            require(
                self.activation == "topk",
                f"--activation is the sparsity rule of a transcoder, crosscoder or clt; for an SAE pass "
                f"--arch {self.activation}",
            )
        given = {
            "--hook": self.hook is not None or bool(self.hooks),
            "--in-hook/--out-hook": self.in_hook is not None or self.out_hook is not None,
            "--layers": self.layers is not None,
        }
        takes = self.sae_class.hook_options
        for options, present in given.items():
            require(
                not present or options == takes, f"{options} does not apply to --arch {self.arch}: it takes {takes}"
            )
        self.sae_class.check_hook_args(self.hook_args)
        require(
            not (self.transcodes and getattr(self.settings, "ghost_grads", False)),
            "--ghost-grads does not apply to transcoders (it revives latents by reconstructing the input)",
        )

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / (self.width / 2**14) ** 0.5

    def to_json(self) -> dict:
        """What cfg.json and checkpoints record: the flat values, the learning rate resolved."""
        d = self.flat()
        d["lr"] = self.resolved_lr()
        for key in ("overwrite", "resume", "progress", "wandb", "wandb_run"):
            d.pop(key)
        return d


def only_hook(hooks: list[str]) -> str:
    """The hook to train on when none is named: the store's only one."""
    require(len(hooks) == 1, f"the store holds several hooks ({', '.join(hooks)}): pick one with --hook")
    return hooks[0]
