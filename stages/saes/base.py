"""What every SAE shares: the affine encoder/decoder, unit-norm decoder rows, the TopK-paper init.

Shapes follow SAELens: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], and
    pre = (x − b_dec) W_enc + b_enc,   x̂ = f(pre) W_dec + b_dec.

Recipe and derivations: docs/architectures.md#the-shared-training-recipe
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from stages.basics import distributed
from stages.basics.errors import require
from stages.saes.io import HookArgs, HookIO


@dataclass
class TrainContext:
    """What the training loop tells an SAE about the current step."""

    mse_scale: float  # E‖x − E[x]‖² of a sample, fixed at the start: the loss's normalizer
    dead: torch.Tensor | None  # bool [d_sae]: latents that have not fired for the dead-latent window
    progress: float  # fraction of training done, in [0, 1)


@dataclass
class DenseCode:
    """A batch of latent codes as a dense matrix [n, d_sae] (ReLU/JumpReLU SAEs: L0 varies by row)."""

    values: torch.Tensor

    def dense(self, d_sae: int) -> torch.Tensor:
        return self.values

    def l0(self) -> torch.Tensor:
        return (self.values > 0).sum(dim=-1)

    def fire_counts(self, d_sae: int) -> torch.Tensor:
        return (self.values > 0).sum(dim=0)


@dataclass
class SparseCode:
    """A batch of latent codes kept sparse: the top values and their latent indices per row."""

    values: torch.Tensor  # [n, k], >= 0
    indices: torch.Tensor  # [n, k] int64

    def dense(self, d_sae: int) -> torch.Tensor:
        out = torch.zeros(self.values.shape[0], d_sae, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.indices, self.values)

    def l0(self) -> torch.Tensor:
        """Active latents per row."""
        return (self.values > 0).sum(dim=-1)

    def fire_counts(self, d_sae: int) -> torch.Tensor:
        """How many rows of the batch each latent fired on [d_sae]."""
        active = self.indices[self.values > 0]
        return torch.bincount(active, minlength=d_sae)


Code = SparseCode | DenseCode


@dataclass(frozen=True)
class ArchExport:
    """How one of our architectures appears in SAELens (see stages.train.saelens_export)."""

    architecture: str  # SAELens's architecture name
    cfg: dict = field(default_factory=dict)  # extra cfg.json fields of that architecture
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # extra weights, in pre-activation space
    # Tied SAEs (SAELens derives W_enc = W_decᵀ): only W_dec and b_dec are written, W_dec not rescaled.
    tied: bool = False
    input_units: tuple[str, ...] = ()  # cfg fields measured in our input's units: divided by the input scale


@dataclass
class ArchSettings:
    """An architecture's own training settings; each SAE module declares its subclass beside the SAE, with
    fields made by stages.basics.settings.setting (help text included: the CLI's options come from them)."""

    def check(self, width: int) -> None:
        """Raise SaepipeError for a value this architecture cannot take at this width."""


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding NaN or inf (an SAE's state dict, an export's files)."""
    return [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]


class SparseAutoencoder(nn.Module):
    """Subclasses set `arch` and `settings_class`, implement `encode`, `training_loss` and `from_settings`,
    and extend `config`."""

    arch = "base"
    settings_class: type[ArchSettings] = ArchSettings
    # Unit-norm decoder rows, kept by removing the gradient's parallel part and renormalizing each
    # step. Architectures whose sparsity penalty is weighted by decoder norms turn this off.
    unit_norm_decoder = True

    # Metrics of training_loss logged beside TrainingRun.KEYS (BatchTopK: the L0 its inference threshold gives).
    extra_log_keys: tuple[str, ...] = ()

    # A transcoder (stages/saes/transcoder.py) reads one hook and writes another: its decoder is d_out wide
    # and its encoder reads its input as it is (no b_dec subtracted). Every other SAE writes what it reads.
    transcodes = False

    # The SAELens format the run folder's export uses: "sae" (an SAE of one hook), "transcoder" (one hook
    # to another), or None where SAELens has none (a crosscoder, a CLT).
    saelens_format: str | None = "sae"

    # Latents numbered layer by layer with one decoder per layer written (a CLT sets its layer count);
    # None: one decoder, whose rows are the latents' directions.
    n_layers: int | None = None

    # The circuit-tracer format `saepipe export` writes it in: "transcoder" (one layer's MLP, in a set of
    # one per layer), "clt" (every layer at once), or None where circuit-tracer reads none.
    circuit_tracer_format: str | None = None

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        d_out = getattr(self, "d_out", d_in)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows and the encoder as their transpose (TopK paper, section 2.3). A
        transcoder's encoder and decoder live in different spaces: its encoder columns are drawn on their
        own, unit-norm like the decoder rows."""
        self.W_dec.copy_(torch.randn(*self.W_dec.shape, generator=generator))
        self.normalize_decoder()
        if self.transcodes:
            encoder = torch.randn(self.d_sae, self.d_in, generator=generator)
            self.W_enc.copy_((encoder / encoder.norm(dim=1, keepdim=True).clamp_min(1e-12)).t())
        else:
            self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.encoder_bias(), x, self.W_enc)

    def encoder_bias(self) -> torch.Tensor:
        """b_enc − b_dec W_enc: (x − b_dec) W_enc + b_enc = x W_enc + this. With b_dec's term as a
        vector-matrix product, x needs no gradient, so the backward is one GEMM (W_enc's gradient)
        instead of two (the second would only feed b_dec)."""
        return self.b_enc - self.b_dec @ self.W_enc

    def selected_pre_acts(self, x: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`pre` (computed without autograd) at the selected latents [n, k], differentiable: the encoder's
        gradient is built from those n·k entries alone. A dense backward would spend a [n, d_sae] x
        [n, d_in] GEMM on a gradient that is zero outside the selection."""
        return selected_pre_acts(x, self.W_enc, self.encoder_bias(), pre, indices)

    def selected_values(self, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`values` [n, k], the pre-activations at `indices` as top_pre_acts found them (without autograd),
        differentiable in W_enc, b_enc and b_dec as selected_pre_acts makes them."""
        return _SelectedPreActs.apply(
            x, self.W_enc, self.b_enc, None if self.transcodes else self.b_dec, indices, values
        )

    # -- what it reads and writes (stages/saes/io.py): an SAE reconstructs its one hook -------------------
    # The train options that name its hooks (HookArgs): the others are refused.
    hook_options = "--hook"

    @classmethod
    def check_hook_args(cls, args: HookArgs) -> None:
        """Refuse hook options this architecture cannot read (the options it does not take are refused
        before this, by `hook_options`)."""
        require(not args.hooks, f"several --hook are for --arch crosscoder, not --arch {cls.arch}: pass one")

    @classmethod
    def hook_io(cls, args: HookArgs) -> HookIO:
        """The store hooks it encodes and reconstructs, from how the run names them."""
        return HookIO((args.hook,), (args.hook,))

    @classmethod
    def shape_for(cls, io: HookIO, width: Callable[[str], int]) -> tuple[int, dict]:
        """(d_in, the other sizes it is built with) from the widths of the store's hooks."""
        return width(io.reads[0]), {}

    @classmethod
    def hook_record(cls, io: HookIO, width: Callable[[str], int], normalization: Callable[[str], dict]) -> dict:
        """What cfg.json records of the hooks besides `hook` and the input's `normalization`."""
        return {}

    @property
    def display_arch(self) -> str:
        """The architecture as tables and reprs name it."""
        return self.arch

    @classmethod
    def recorded_io(cls, record: dict) -> tuple[HookIO, dict[str, dict]]:
        """(the hooks it encodes and reconstructs, each hook's normalization record) from a run's cfg.json:
        what `hook_record` and the loop wrote."""
        hook = record["hook"]
        return HookIO((hook,), (hook,)), {hook: record["normalization"]}

    def widths_at(self, io: HookIO) -> dict[str, int]:
        """The width of each hook it reads and writes: what a store must hold to evaluate it."""
        return {hook: self.d_in for hook in io.reads} | {hook: self.W_dec.shape[1] for hook in io.writes}

    @classmethod
    def missing_hooks_error(cls, io: HookIO, location: str, missing: list[str]) -> str | None:
        """The error for a store at `location` that lacks `missing` of the hooks, where this architecture
        can say better how to collect them than naming them (None: the store's own error)."""
        return None

    @classmethod
    def from_settings(cls, d_in: int, width: int, settings: ArchSettings, **extra) -> SparseAutoencoder:
        """A new SAE of `width` latents for inputs of width `d_in`, from its architecture's settings.
        `extra`: constructor arguments of a subclass (a transcoder's d_out), passed through."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Code:
        raise NotImplementedError

    def training_loss(
        self, x: torch.Tensor, ctx: TrainContext, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached metrics incl. loss, mse, fve, l0, aux_loss and fire_counts [d_sae]). `target`:
        the rows the decoder must reconstruct, x itself unless the SAE transcodes."""
        raise NotImplementedError

    def target_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """The part of a training batch the decoder reconstructs (all of it; a transcoder's output hook)."""
        return batch

    def saelens_export(self) -> ArchExport:
        """The SAELens architecture this SAE exports as (weights in our normalized space)."""
        raise ValueError(f"cannot export {self.arch!r} SAEs to SAELens")

    def decode(self, code: Code) -> torch.Tensor:
        return self.decode_rows(code) + self.b_dec

    def output(self, x: torch.Tensor, code: Code) -> torch.Tensor:
        """What the SAE writes for input x with its code: the decoding (a skip transcoder adds its linear
        path from x)."""
        return self.decode(code)

    def decode_rows(self, code: Code) -> torch.Tensor:
        """The decoder's output without b_dec. A sparse code is decoded as a weighted sum of its k
        decoder rows (also what AuxK reconstructs the residual with), never a dense d_sae matmul."""
        if isinstance(code, DenseCode):
            return code.values.to(self.W_dec.dtype) @ self.W_dec
        return nn.functional.embedding_bag(
            code.indices, self.W_dec, per_sample_weights=code.values.to(self.W_dec.dtype), mode="sum"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- the decoder-norm constraint ----------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.remove_parallel_gradient()

    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient that would only change the row's norm."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum(dim=1, keepdim=True) * w)

    def config(self) -> dict:
        """Architecture hyper-parameters, enough to rebuild the module (see stages.saes.build_sae)."""
        return {"arch": self.arch, "d_in": self.d_in, "d_sae": self.d_sae}


def selected_pre_acts(
    x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """x W_enc + bias (already computed, without autograd, as `pre`) at `indices` [n, k], differentiable
    in W_enc and bias through those n·k entries alone (SparseAutoencoder.selected_pre_acts)."""
    return _SelectedPreActs.apply(x, W_enc, bias, None, indices, pre.gather(1, indices))


# Rows of pre-activations per block of top_pre_acts on a CPU: a [512, d_sae] block of the encoder's GEMM
# output is still in cache when top-k reads it (at d 576, width 4,096, batch 4,096 on this project's 2-core
# CPU, GEMM and top-k took 124 ms in blocks of 512 rows against 137 ms whole; 256 and 1,024 rows: 130, 125).
TOP_BLOCK_ROWS = 512


@dataclass
class TopSelection:
    """The k largest pre-activations of each row, and (AuxK) the k_among largest among some latents."""

    values: torch.Tensor  # [n, k]
    indices: torch.Tensor  # [n, k] int64
    among_values: torch.Tensor | None = None  # [n, k_among]
    among_indices: torch.Tensor | None = None


@torch.no_grad()
def top_pre_acts(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    among: torch.Tensor | None = None,
    k_among: int = 0,
) -> TopSelection:
    """The top k of x W_enc + bias per row (unsorted), and with `among` (bool [d_sae]) the top k_among of
    the latents it marks, without autograd. On a CPU in float32 this runs a block of rows at a time, each
    block's GEMM output read by top-k while it is in cache, and the [n, d_sae] pre-activations are never
    held whole; elsewhere (a GPU, autocast) in one GEMM."""
    n, width = x.shape[0], W_enc.shape[1]
    blocked = x.device.type == "cpu" and x.dtype == W_enc.dtype == torch.float32 and n > TOP_BLOCK_ROWS
    if not blocked:
        return _top_of(torch.addmm(bias, x, W_enc), k, among, k_among)
    out = TopSelection(x.new_empty(n, k), torch.empty(n, k, dtype=torch.long, device=x.device))
    if among is not None:
        out.among_values = x.new_empty(n, k_among)
        out.among_indices = torch.empty(n, k_among, dtype=torch.long, device=x.device)
    buffer = x.new_empty(TOP_BLOCK_ROWS, width)  # one block's pre-activations, reused: no allocation per block
    for start in range(0, n, TOP_BLOCK_ROWS):
        rows = slice(start, min(n, start + TOP_BLOCK_ROWS))
        pre = torch.addmm(bias, x[rows], W_enc, out=buffer[: rows.stop - start])
        torch.topk(pre, k, dim=-1, sorted=False, out=(out.values[rows], out.indices[rows]))
        if among is not None:
            masked = pre.masked_fill_(~among, float("-inf"))  # the block is spent: mask it in place
            torch.topk(masked, k_among, dim=-1, sorted=False, out=(out.among_values[rows], out.among_indices[rows]))
    return out


def _top_of(pre: torch.Tensor, k: int, among: torch.Tensor | None, k_among: int) -> TopSelection:
    values, indices = pre.topk(k, dim=-1, sorted=False)
    if among is None:
        return TopSelection(values, indices)
    among_values, among_indices = pre.masked_fill(~among, float("-inf")).topk(k_among, dim=-1, sorted=False)
    return TopSelection(values, indices, among_values, among_indices)


class _SelectedPreActs(torch.autograd.Function):
    """values[i, j] = x[i] · W_enc[:, indices[i, j]] + bias[indices[i, j]], given precomputed, where bias
    is b_enc − b_dec W_enc (b_enc alone when b_dec is None). The backward scatters the n·k gradients into
    W_enc's columns with one sparse x dense product, and adds b_dec's rank-one term to that same buffer in
    place (left to autograd, it was an outer-product GEMM and a second pass over W_enc's gradient)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, indices, values):
        ctx.save_for_backward(x, indices, W_enc if b_dec is not None else None, b_dec)
        ctx.d_sae = W_enc.shape[1]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x, indices, W_enc, b_dec = ctx.saved_tensors
        n, k = indices.shape
        grad = grad.to(x.dtype)
        latents = indices.reshape(-1)
        grad_bias = grad.new_zeros(ctx.d_sae).index_add_(0, latents, grad.reshape(-1))
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        scatter = torch.sparse_coo_tensor(
            torch.stack([latents, rows]), grad.reshape(-1), (ctx.d_sae, n), check_invariants=False
        )  # valid by construction
        grad_W_enc_t = torch.sparse.mm(scatter, x)  # [d_sae, d_in]
        grad_b_dec = None
        if b_dec is not None:  # bias = b_enc − b_dec W_enc
            grad_W_enc_t.addr_(grad_bias, b_dec.to(grad_W_enc_t.dtype), alpha=-1)
            grad_b_dec = -(W_enc.to(grad_bias.dtype) @ grad_bias).to(b_dec.dtype)
        return None, grad_W_enc_t.t(), grad_bias, grad_b_dec, None, None


def reconstruction_metrics(
    x: torch.Tensor, sq_err: torch.Tensor, code, d_sae: int, loss: torch.Tensor, aux: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The per-batch metrics every architecture's training_loss reports (detached)."""
    with torch.no_grad():
        # fve over the global batch under data parallelism (the other metrics are averaged over ranks later)
        variance = distributed.global_mean((x - distributed.global_mean(x.mean(dim=0))).pow(2).sum(dim=-1).mean())
        return {
            "loss": loss.detach(),
            "mse": sq_err.mean().detach() / x.shape[-1],
            "aux_loss": aux.detach(),
            "fve": 1 - distributed.global_mean(sq_err.mean().detach()) / variance,
            "l0": code.l0().float().mean(),
            "fire_counts": code.fire_counts(d_sae),
        }


def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm in float64: the point minimizing the sum of distances to `points` [n, d]."""
    x = points.detach().double()
    median = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-12)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        moved = (new - median).norm() / median.norm().clamp_min(1e-12)
        median = new
        if moved < tol:
            break
    return median.to(points.dtype)
