"""Cross-layer transcoder (CLT): for a range of L consecutive layers, one encoder per layer reads that layer's
MLP input, and each layer's latents write into that layer's MLP output and every later one's (Anthropic,
"Circuit Tracing: Revealing Computational Graphs in Language Models", 2025):

    f_l = TopK(x_l W_enc,l + b_enc,l)                 x_l: layer l's MLP input (blocks.l.mlp.hook_in)
    ŷ_m = Σ_{l ≤ m} f_l W_dec,l→m + b_dec,m           ŷ_m: layer m's MLP output (blocks.m.hook_mlp_out)

The decoder is stored by the layer written: W_dec[m] [(m + 1) · width, d_out] holds what the latents of
layers 0 .. m write into layer m, so each layer's output is one sparse product of the joined code (slicing
one matrix per source layer into its targets' blocks and summing them cost the backward a copy of every
block: 5 times slower at 30 layers). A latent's writes into all later layers are its decoder "row"
(`writes_of`); that row's norm is kept at 1 (the TopK recipe's constraint, on the whole row), and the loss
is the squared error summed over every layer's output. TopK is the sparsity rule (k active latents per
layer and token), with AuxK per layer for dead latents.

Latents are numbered layer by layer: latent l · width + i is latent i of layer l; `d_sae` counts them all.
A training batch is the tuple of row-aligned batches (x_0 .. x_{L−1}, y_0 .. y_{L−1}), or those side by
side (the initialization sample); `encode` and `forward` take the inputs side by side [n, L · d_in].

Formulas and the planted-feature test: docs/architectures.md#cross-layer-transcoders-clt (measurements:
docs/history.md#architectures-how-the-recipes-were-arrived-at)
"""

from __future__ import annotations

import torch
from torch import nn

from stages.basics import distributed
from stages.basics.errors import require
from stages.saes.base import (
    DenseCode,
    SparseAutoencoder,
    SparseCode,
    TrainContext,
    reconstruction_metrics,
    selected_pre_acts,
)
from stages.saes.batchtopk import BatchTopKSAE, above_threshold, batch_top_k, moved_threshold
from stages.saes.io import HookArgs, HookIO, several_hooks_from_record, several_hooks_record
from stages.saes.topk import TopKSettings

# A layer's sparse code: (values [n, k], indices into that layer's latents [n, k]).
LayerCode = tuple[torch.Tensor, torch.Tensor]


class CrossLayerTranscoder(SparseAutoencoder):
    arch = "clt"
    activation = "topk"
    settings_class = TopKSettings
    transcodes = True
    saelens_format = None
    circuit_tracer_format = "clt"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        aux_k: int | None = None,
        aux_coef: float = 1 / 32,
        *,
        d_out: int,
        n_layers: int,
    ):
        nn.Module.__init__(self)  # its weights are per layer, not the single matrices of SparseAutoencoder
        if d_sae % n_layers:
            raise ValueError(f"d_sae {d_sae} is not a whole number of latents for each of {n_layers} layers")
        self.d_in, self.d_sae, self.d_out, self.n_layers = d_in, d_sae, int(d_out), int(n_layers)
        self.width = d_sae // n_layers  # latents per layer
        if not 0 < k <= self.width:
            raise ValueError(f"k must be in [1, width={self.width}], got {k}")
        self.k, self.aux_k, self.aux_coef = k, aux_k if aux_k is not None else d_in // 2, aux_coef
        layers = range(self.n_layers)
        self.W_enc = nn.ParameterList(nn.Parameter(torch.empty(d_in, self.width)) for _ in layers)
        self.b_enc = nn.Parameter(torch.zeros(self.n_layers, self.width))
        # by the layer written: W_dec[m] holds the writes of layers 0 .. m's latents into layer m
        self.W_dec = nn.ParameterList(
            nn.Parameter(torch.empty((layer + 1) * self.width, self.d_out)) for layer in layers
        )
        self.b_dec = nn.Parameter(torch.zeros(self.n_layers * self.d_out))
        self.reset_parameters()

    # -- what it reads and writes: each layer's MLP input, and each layer's MLP output -------------------
    hook_options = "--layers"

    @classmethod
    def check_hook_args(cls, args: HookArgs) -> None:
        require(args.layers is not None, "--arch clt needs --layers first-last (e.g. --layers 0-29)")

    @classmethod
    def hook_io(cls, args: HookArgs) -> HookIO:
        layers = args.layers or range(0)
        return HookIO(
            tuple(f"blocks.{layer}.mlp.hook_in" for layer in layers),
            tuple(f"blocks.{layer}.hook_mlp_out" for layer in layers),
        )

    @classmethod
    def shape_for(cls, io: HookIO, width) -> tuple[int, dict]:
        """Every layer's MLP input and output are d_model wide: `width` latents for each layer."""
        return width(io.reads[0]), {"d_out": width(io.writes[0]), "n_layers": len(io.reads)}

    @classmethod
    def hook_record(cls, io: HookIO, width, normalization) -> dict:
        """Every hook read and written, each with its normalization, and the layers."""
        layers = [int(hook.split(".")[1]) for hook in io.reads]
        record = several_hooks_record(io, normalization)
        return {**record, "layers": [layers[0], layers[-1]]}

    @classmethod
    def recorded_io(cls, record: dict) -> tuple[HookIO, dict[str, dict]]:
        return several_hooks_from_record(record)

    def widths_at(self, io: HookIO) -> dict[str, int]:
        return {hook: self.d_in for hook in io.reads} | {hook: self.d_out for hook in io.writes}

    @classmethod
    def missing_hooks_error(cls, io: HookIO, location: str, missing: list[str]) -> str | None:
        layers = [int(hook.split(".")[1]) for hook in io.reads]
        span = f"{layers[0]}-{layers[-1]}"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return (
            f"--arch clt --layers {span} reads each layer's MLP input and output, but store {location} lacks "
            f"{missing[0]}{more}: collect with --hook 'blocks.{{{span}}}.mlp.hook_in' --hook 'blocks.{{{span}}}.hook_mlp_out'"
        )

    @classmethod
    def from_settings(cls, d_in: int, width: int, settings: TopKSettings, **extra) -> CrossLayerTranscoder:
        """`width` latents for each of extra["n_layers"] layers."""
        n_layers = extra["n_layers"]
        return cls(d_in, width * n_layers, settings.resolved_k, settings.aux_k, settings.aux_coef, **extra)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, and unit-norm encoder columns drawn on their own (the encoder
        reads another space than the decoder writes, as a transcoder's)."""
        for W_enc, W_dec in zip(self.W_enc, self.W_dec):  # noqa: N806
            W_dec.copy_(torch.randn(*W_dec.shape, generator=generator))
            encoder = torch.randn(self.width, self.d_in, generator=generator)
            W_enc.copy_((encoder / encoder.norm(dim=1, keepdim=True).clamp_min(1e-12)).t())
        self.normalize_decoder()
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- the batch's parts ----------------------------------------------------------------------------
    def layer_inputs(self, batch) -> list[torch.Tensor]:
        """Each layer's input rows [n, d_in], from a training tuple or from rows side by side."""
        if isinstance(batch, tuple):
            return list(batch[: self.n_layers])
        return list(batch[..., : self.n_layers * self.d_in].split(self.d_in, dim=-1))

    def target_rows(self, batch) -> torch.Tensor:
        """Every layer's output rows, side by side [n, L · d_out]."""
        if isinstance(batch, tuple):
            return torch.cat(batch[self.n_layers :], dim=1)
        return batch[..., self.n_layers * self.d_in :]

    # -- encoding and decoding -----------------------------------------------------------------------
    def layer_pre_acts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc[layer], x, self.W_enc[layer])

    def encode_layer(self, layer: int, x: torch.Tensor) -> LayerCode | torch.Tensor:
        """Layer `layer`'s code of its input rows x [n, d_in]: its top k latents (indices within the layer)."""
        values, indices = self.layer_pre_acts(layer, x).topk(self.k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> SparseCode:
        """The code of every layer's inputs side by side [n, L · d_in], latents numbered layer by layer."""
        codes = [self.encode_layer(layer, x_l) for layer, x_l in enumerate(self.layer_inputs(x))]
        return self._joined(codes)

    def _joined(self, codes: list) -> SparseCode | DenseCode:
        if isinstance(codes[0], torch.Tensor):  # dense codes [n, width] (a BatchTopK CLT's inference)
            return DenseCode(torch.cat(codes, dim=1))
        values = torch.cat([v for v, _ in codes], dim=1)
        indices = torch.cat([i + layer * self.width for layer, (_, i) in enumerate(codes)], dim=1)
        return SparseCode(values, indices)

    def _split(self, code) -> list[LayerCode | torch.Tensor]:
        """A code of all layers as each layer's: (values, indices within the layer), or dense [n, width]."""
        if isinstance(code, DenseCode):
            return list(code.values.split(self.width, dim=-1))
        layer_of = code.indices // self.width
        per_layer, rest = divmod(code.indices.shape[1], self.n_layers)
        blocks = torch.arange(self.n_layers, device=layer_of.device).repeat_interleave(per_layer)
        if not rest and torch.equal(layer_of, blocks.expand_as(layer_of)):  # as `encode` makes them: by layer
            pairs = zip(code.values.split(per_layer, dim=1), code.indices.split(per_layer, dim=1))
            return [(values, indices - layer * self.width) for layer, (values, indices) in enumerate(pairs)]
        # any other order: entries of other layers keep their place with weight 0
        local = code.indices % self.width
        return [(code.values * (layer_of == layer), local) for layer in range(self.n_layers)]

    def decode_layers(self, codes: list) -> torch.Tensor:
        """Every layer's output without b_dec, [n, L · d_out], from each layer's code: `codes[l]` is
        (values, indices within the layer), dense [n, width], or None (nothing from that layer)."""
        return torch.cat([self._written_into(layer, codes) for layer in range(self.n_layers)], dim=1)

    def _written_into(self, layer: int, codes: list) -> torch.Tensor:
        """What the latents of layers 0 .. `layer` write into `layer` [n, d_out]: one product with W_dec[layer]."""
        weights = self.W_dec[layer]
        sources = [(source, code) for source, code in enumerate(codes[: layer + 1]) if code is not None]
        if not sources:
            n = next(c for c in codes if c is not None)
            return weights.new_zeros((n if isinstance(n, torch.Tensor) else n[0]).shape[0], self.d_out)
        if isinstance(sources[0][1], torch.Tensor):  # dense codes: each source's block of rows
            w = self.width
            return sum(code.to(weights.dtype) @ weights[s * w : (s + 1) * w] for s, code in sources)
        values = torch.cat([v for _, (v, _) in sources], dim=1).to(weights.dtype)
        indices = torch.cat([i + source * self.width for source, (_, i) in sources], dim=1)
        # Only the non-zero entries, as variable-length bags: a BatchTopK code pads every row to its batch's
        # busiest one, which on real activations can be most of a layer's latents.
        kept = values != 0
        counts = kept.sum(dim=1)
        offsets = torch.cumsum(counts, dim=0) - counts
        return nn.functional.embedding_bag(indices[kept], weights, offsets, per_sample_weights=values[kept], mode="sum")

    def decode_rows(self, code) -> torch.Tensor:
        return self.decode_layers(self._split(code))

    def output(self, x: torch.Tensor, code) -> torch.Tensor:
        return self.decode(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer's MLP output predicted from every layer's MLP input (both side by side)."""
        return self.decode(self.encode(x))

    def layer_output(self, layer: int, codes: list) -> torch.Tensor:
        """Layer `layer`'s predicted output [n, d_out] from the codes of layers 0 .. `layer` (what a splice
        into the model has when that layer's MLP output is reached)."""
        return self._written_into(layer, codes) + self.b_dec[layer * self.d_out : (layer + 1) * self.d_out]

    def writes_of(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s latents' writes into layers `layer` .. L − 1: [width, L − layer, d_out]."""
        rows = slice(layer * self.width, (layer + 1) * self.width)
        return torch.stack([self.W_dec[m][rows] for m in range(layer, self.n_layers)], dim=1)

    def active_per_layer(self, code) -> torch.Tensor:
        """How many latents of each layer are active, summed over the code's rows [n_layers]."""
        if isinstance(code, DenseCode):
            return (code.values > 0).view(-1, self.n_layers, self.width).sum(dim=(0, 2))
        return torch.bincount((code.indices // self.width)[code.values > 0], minlength=self.n_layers)

    # -- training ------------------------------------------------------------------------------------
    def training_loss(self, batch, ctx: TrainContext, target: torch.Tensor | None = None):
        """‖y − ŷ‖² summed over every layer's output, / mse_scale, + aux_coef · AuxK (per layer: each layer's
        top `aux_k` dead latents reconstruct the residual of all outputs)."""
        xs, y = self.layer_inputs(batch), self.target_rows(batch)
        with torch.no_grad():
            pres = [self.layer_pre_acts(layer, x) for layer, x in enumerate(xs)]
        codes = [self.training_code(layer, x, pre) for layer, (x, pre) in enumerate(zip(xs, pres))]
        recon = self.decode_layers(codes) + self.b_dec
        sq_err = (recon - y).pow(2).sum(dim=-1)
        aux = self.auxk_loss(xs, pres, y - recon, ctx.dead)
        loss = sq_err.mean() / ctx.mse_scale + self.aux_coef * aux
        return loss, reconstruction_metrics(y, sq_err, self._joined(codes), self.d_sae, loss, aux)

    def training_code(self, layer: int, x: torch.Tensor, pre: torch.Tensor) -> LayerCode:
        """Layer `layer`'s code of a training batch, differentiable through the selected entries only."""
        indices = pre.topk(self.k, dim=-1, sorted=False).indices
        return selected_pre_acts(x, self.W_enc[layer], self.b_enc[layer], pre, indices).relu(), indices

    def auxk_loss(self, xs, pres, residual: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        if dead is None or self.aux_coef == 0 or not bool(dead.any()):
            return torch.zeros((), device=residual.device)
        residual = residual.detach()
        codes = []
        for layer, (x, pre, dead_here) in enumerate(zip(xs, pres, dead.view(self.n_layers, self.width))):
            n_dead = int(dead_here.sum())
            if n_dead == 0:
                codes.append(None)
                continue
            with torch.no_grad():
                masked = pre.masked_fill(~dead_here, float("-inf"))
                indices = masked.topk(min(self.aux_k, n_dead), dim=-1, sorted=False).indices
            values = selected_pre_acts(x, self.W_enc[layer], self.b_enc[layer], pre, indices).relu()
            codes.append((values, indices))
        aux_recon = self.decode_layers(codes)
        mean = distributed.global_mean(residual.mean(dim=0))
        baseline = distributed.global_mean((residual - mean).pow(2).sum(dim=-1).mean()).clamp_min(1e-12)
        return (aux_recon - residual).pow(2).sum(dim=-1).mean() / baseline

    # -- the decoder-norm constraint, per latent over all the layers it writes -----------------------------
    def _latent_norms(self) -> torch.Tensor:
        """Each latent's decoder norm over every layer it writes [L · width]."""
        squares = self.W_dec[0].new_zeros(self.d_sae)
        for weights in self.W_dec:
            squares[: weights.shape[0]] += weights.detach().pow(2).sum(dim=1)
        return squares.sqrt().clamp_min(1e-12)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        norms = self._latent_norms()
        for weights in self.W_dec:
            weights.div_(norms[: weights.shape[0], None])

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each latent's gradient, over all its writes, along its whole decoder row."""
        if any(weights.grad is None for weights in self.W_dec):
            return
        norms = self._latent_norms()
        along = self.W_dec[0].new_zeros(self.d_sae)  # g · w / ‖w‖², summed over the written layers
        for weights in self.W_dec:
            along[: weights.shape[0]] += (weights.grad * weights).sum(dim=1)
        along /= norms.pow(2)
        for weights in self.W_dec:
            weights.grad.sub_(along[: weights.shape[0], None] * weights)

    def saelens_export(self):
        raise ValueError("SAELens has no cross-layer transcoder format (a CLT exports for circuit-tracer)")

    def config(self) -> dict:
        return {
            "arch": self.arch,
            "activation": self.activation,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "d_out": self.d_out,
            "n_layers": self.n_layers,
            "k": self.k,
            "aux_k": self.aux_k,
            "aux_coef": self.aux_coef,
        }


class BatchTopKCrossLayerTranscoder(CrossLayerTranscoder):
    """A CLT whose layers select as BatchTopK does (stages/saes/batchtopk.py): in training, each layer keeps
    the k·B largest pre-activations of its batch; at inference each layer is a JumpReLU with its own
    threshold θ_l (an EMA of the training cut-offs), which is what circuit-tracer's JumpReLU CLT computes."""

    activation = "batchtopk"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(self.n_layers))  # persistent: needed at inference

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The CLT's init with each encoder scaled down as a BatchTopK SAE's (BatchTopKSAE.encoder_init_scale):
        unit-norm encoders make the first batch selections overshoot."""
        super().reset_parameters(generator)
        for W_enc in self.W_enc:  # noqa: N806
            W_enc.mul_(BatchTopKSAE.encoder_init_scale(self.d_in, self.width))
        if hasattr(self, "threshold"):  # not yet registered when the base constructor calls this
            self.threshold.zero_()

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s dense code [n, width]: pre-activations above the layer's threshold."""
        return above_threshold(self.layer_pre_acts(layer, x), self.threshold[layer])

    def training_code(self, layer: int, x: torch.Tensor, pre: torch.Tensor) -> LayerCode:
        selected = batch_top_k(pre, self.k)
        values = selected_pre_acts(x, self.W_enc[layer], self.b_enc[layer], pre, selected.indices)
        values = values.masked_fill(selected.values <= 0, 0.0)
        if self.training:
            self.threshold[layer] = moved_threshold(self.threshold[layer], values, BatchTopKSAE.THRESHOLD_RATE)
        return values, selected.indices
