"""Matching-pursuit SAE: one unit-norm dictionary (free atom norms with `--free-atom-norms`, as SAELens's
trainer leaves them), encoded greedily, as SAELens 6's ``matching_pursuit``.

Each step picks the latent with the highest r · W_i, adds c = max(r · W_j, 0) to it and removes c · W_j
from the residual r (r starts at x − b_dec): exactly k steps (static), or until the residual threshold,
a step that does not grow the support, or max_iterations (dynamic). Rows run batched in lockstep, with
scores updated through the Gram matrix W Wᵀ. W_dec is the only weight matrix: W_enc = W_decᵀ, b_enc = 0.

Algorithm, backward and settings: docs/architectures.md#mp (measurements: docs/history.md#architectures-how-the-recipes-were-arrived-at)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.basics.errors import SaepipeError
from stages.basics.settings import refuse_unless, setting
from stages.saes.base import ArchExport, SparseAutoencoder, SparseCode, TrainContext, reconstruction_metrics
from stages.saes.topk import DEFAULT_K, KSettings

GRAM_MAX_WIDTH = 16_384  # G = W Wᵀ is d_sae² floats: 1 GiB at this width; wider SAEs rescore with a matmul
CPU_ROW_BLOCK = 1024  # rows per pursuit block on CPU (see MatchingPursuitSAE._select)
CHECK_EVERY = 8  # dynamic variant: steps between checks that every row has stopped (a host sync)


@dataclass
class Pursuit:
    """One batched pursuit, step by step (T steps run; tests and diagnostics read it)."""

    code: SparseCode  # merged: each latent once per row, coefficients summed; zero-valued padding slots
    indices: torch.Tensor  # [n, T] latent picked at each step
    coefs: torch.Tensor  # [n, T] coefficient added at each step (0 once the row has stopped)
    steps: torch.Tensor  # [n] steps each row took, its stopping step included
    residual: torch.Tensor | None  # [n, d_in] x − x̂; None unless asked for or computed anyway (autograd,
    # a residual threshold, matmul scoring)


@dataclass
class MatchingPursuitSettings(KSettings):
    """Static (exactly k steps) unless a residual threshold or an iteration cap asks for the dynamic variant."""

    residual_threshold: float | None = setting(None, "dynamic variant: stop when ‖residual‖ falls below")
    max_iterations: int | None = setting(None, "dynamic variant: at most this many selections per row")
    free_atom_norms: bool = setting(
        False, "let the atoms' norms drift in training, as SAELens does (a per-atom gain; docs/quality.md)"
    )

    @property
    def dynamic(self) -> bool:
        return self.residual_threshold is not None or self.max_iterations is not None

    def check(self, width: int) -> None:
        if not self.dynamic:
            super().check(width)
            return
        if self.k is not None:
            raise SaepipeError(
                "--k sets the static matching pursuit's steps; the dynamic variant "
                "(--residual-threshold, --max-iterations) takes none: cap it with --max-iterations"
            )
        refuse_unless(
            self.residual_threshold is None or 0 < self.residual_threshold < float("inf"),
            self,
            "residual_threshold",
            f"must be a positive number, got {self.residual_threshold}",
        )
        refuse_unless(
            self.max_iterations is None or self.max_iterations >= 1,
            self,
            "max_iterations",
            f"must be at least 1, got {self.max_iterations}",
        )


class MatchingPursuitSAE(SparseAutoencoder):
    arch = "mp"
    settings_class = MatchingPursuitSettings

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int | None = DEFAULT_K,
        residual_threshold: float | None = None,
        max_iterations: int | None = None,
        free_atom_norms: bool = False,
    ):
        dynamic = residual_threshold is not None or max_iterations is not None
        if dynamic and k is not None:
            raise ValueError("k is the static variant's step count; the dynamic variant takes none")
        if not dynamic and (k is None or not 0 < k <= d_sae):
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        if residual_threshold is not None and not residual_threshold > 0:
            raise ValueError(f"residual_threshold must be positive, got {residual_threshold}")
        if max_iterations is not None and max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
        nn.Module.__init__(self)  # not SparseAutoencoder.__init__: no separate W_enc/b_enc parameters
        self.d_in, self.d_sae = d_in, d_sae
        self.k, self.residual_threshold, self.max_iterations = k, residual_threshold, max_iterations
        # Free norms: an atom of norm g removes g² of the residual's part along it at each pick, which
        # leaves room for later picks; the pursuit's arithmetic is the same (SAELens's).
        self.unit_norm_decoder = not free_atom_norms
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters()

    @classmethod
    def from_settings(cls, d_in: int, width: int, settings: MatchingPursuitSettings, **extra) -> MatchingPursuitSAE:
        free = settings.free_atom_norms
        if not settings.dynamic:
            return cls(d_in, width, settings.resolved_k, free_atom_norms=free, **extra)
        return cls(d_in, width, None, settings.residual_threshold, settings.max_iterations, free, **extra)

    # -- tying: W_dec is the dictionary, the encoder is derived ---------------------------------------
    @property
    def W_enc(self) -> torch.Tensor:
        return self.W_dec.t()

    @property
    def b_enc(self) -> torch.Tensor:
        return torch.zeros(self.d_sae, dtype=self.W_dec.dtype, device=self.W_dec.device)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.W_dec.copy_(torch.randn(self.d_sae, self.d_in, generator=generator))
        self.normalize_decoder()
        self.b_dec.zero_()

    @property
    def dynamic(self) -> bool:
        return self.residual_threshold is not None or self.max_iterations is not None

    @property
    def iterations(self) -> int:
        """Steps per row: k (static); at most max_iterations, else d_in (dynamic)."""
        if not self.dynamic:
            return self.k
        return self.max_iterations if self.max_iterations is not None else self.d_in

    # -- encoding ------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> SparseCode:
        return self.pursue(x).code

    def pursue(self, x: torch.Tensor, scoring: str = "auto", residual: bool = False) -> Pursuit:
        """Encode a batch [n, d_in]. `scoring`: "gram", "matmul" or "auto" (gram unless G is too big or
        costs more than rescoring: d_sae > GRAM_MAX_WIDTH or d_sae > n·T). `residual`: always keep x − x̂."""
        W = self.W_dec
        n, steps_max = x.shape[0], self.iterations
        if scoring == "auto":
            scoring = "gram" if self.d_sae <= min(GRAM_MAX_WIDTH, n * steps_max) else "matmul"
        if scoring not in ("gram", "matmul"):
            raise ValueError(f"scoring must be gram, matmul or auto, got {scoring!r}")
        with torch.autocast(x.device.type, enabled=False):  # the greedy choice needs full precision
            return self._pursue(x.to(W.dtype), scoring == "gram", residual)

    def _pursue(self, x: torch.Tensor, gram: bool, residual: bool) -> Pursuit:
        W, b_dec = self.W_dec, self.b_dec
        track = torch.is_grad_enabled() and (W.requires_grad or b_dec.requires_grad or x.requires_grad)
        with torch.no_grad():
            indices, coefs, steps, r = self._select(x - b_dec, gram, keep_residual=residual and not track)
        if track:
            coefs, r = self._replay(x, indices, coefs)
        return Pursuit(merge_picks(indices, coefs, self.d_sae), indices, coefs, steps, r)

    def _select(self, r: torch.Tensor, gram: bool, keep_residual: bool):
        """The pursuit without autograd: (indices, coefs [n, T], steps [n], residual or None).

        On CPU, rows go through in blocks of CPU_ROW_BLOCK: a block's [rows, d_sae] scores stay in cache
        across the T steps (docs/architectures.md#mp). Rows are independent, so the result is the same."""
        W = self.W_dec.detach()
        G = W @ W.T if gram else None
        block = CPU_ROW_BLOCK if r.device.type == "cpu" else r.shape[0]
        if r.shape[0] <= block:
            return self._select_rows(r, W, G, keep_residual)
        parts = [self._select_rows(r[i : i + block], W, G, keep_residual) for i in range(0, r.shape[0], block)]
        width = max(p[0].shape[1] for p in parts)  # dynamic blocks may stop after different step counts

        def padded(t: torch.Tensor, fill) -> torch.Tensor:
            return nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

        indices = torch.cat([padded(p[0], 0) for p in parts])
        coefs = torch.cat([padded(p[1], 0.0) for p in parts])
        residual = None if parts[0][3] is None else torch.cat([p[3] for p in parts])
        return indices, coefs, torch.cat([p[2] for p in parts]), residual

    def _select_rows(self, r: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, keep_residual: bool):
        gram = G is not None
        n, threshold = r.shape[0], self.residual_threshold
        keep_residual = keep_residual or not gram or threshold is not None
        scores = r @ W.T  # [n, d_sae], kept equal to r · Wᵀ
        if gram:
            rows = torch.empty_like(scores)  # G[j], reused (no allocation per step)
        if self.dynamic:
            running = torch.ones(n, dtype=torch.bool, device=r.device)
            in_support = torch.zeros(n, self.d_sae, dtype=torch.bool, device=r.device)
            steps = torch.zeros(n, dtype=torch.long, device=r.device)
        picked, coefs = [], []
        for t in range(self.iterations):
            # The highest r · W_i. SAELens takes the argmax of the ReLU'd scores: the same pick whenever some
            # score is positive; when none is, both add 0.
            best, j = scores.max(dim=1)
            c = best.relu()
            if self.dynamic:
                c *= running
            if keep_residual:
                r = r - c[:, None] * W[j]
            if gram:
                scores.addcmul_(torch.index_select(G, 0, j, out=rows), c[:, None], value=-1)
            else:
                torch.matmul(r, W.T, out=scores)
            if self.dynamic:
                steps += running
                was_in = in_support.gather(1, j[:, None]).squeeze(1)
                in_support.scatter_(1, j[:, None], (was_in | (c > 0))[:, None])
                stop = was_in | (c <= 0)  # the support did not grow
                if threshold is not None:
                    stop |= r.norm(dim=-1) < threshold
                running &= ~stop
            picked.append(j)
            coefs.append(c)
            if self.dynamic and (t + 1) % CHECK_EVERY == 0 and not bool(running.any()):
                break
        indices, coefs = torch.stack(picked, dim=1), torch.stack(coefs, dim=1)
        if not self.dynamic:
            steps = torch.full((n,), indices.shape[1], dtype=torch.long, device=r.device)
        return indices, coefs, steps, r if keep_residual else None

    def _replay(self, x: torch.Tensor, indices: torch.Tensor, coefs: torch.Tensor):
        """A fixed selection replayed differentiably: c_t = relu(r · W[j_t]) where the selection added
        something (0 elsewhere), r −= c_t · W[j_t]. Returns (coefficients [n, T], final residual), both
        differentiable in x, W and b_dec; they equal the selection's up to rounding. The backward is
        written out (_PursuitReplay) so that no [T, n, d_in] intermediates are kept."""
        live = (coefs > 0).to(x.dtype)
        return _PursuitReplay.apply(x, self.W_dec, self.b_dec, indices, live)

    # -- training ------------------------------------------------------------------------------------
    def training_loss(self, x: torch.Tensor, ctx: TrainContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss = ‖x − x̂‖² / mse_scale, x − x̂ being the pursuit's final residual. No auxiliary loss: a
        latent that never wins a pursuit gets no gradient (SAELens's MP has none either)."""
        pursuit = self.pursue(x, residual=True)
        sq_err = pursuit.residual.pow(2).sum(dim=-1)
        loss = sq_err.mean() / ctx.mse_scale
        aux = torch.zeros((), device=x.device)
        return loss, reconstruction_metrics(x, sq_err, pursuit.code, self.d_sae, loss, aux)

    def saelens_export(self) -> ArchExport:
        # SAELens's matching_pursuit: tied (only W_dec and b_dec; W_enc = W_decᵀ), positive-only picks,
        # residual_threshold 0 disables the threshold, max_iterations caps the steps. Static: k steps, no
        # stopping rule; dynamic: our threshold (in input units: the export divides it by the
        # normalization's scale) and stop_on_duplicate_support.
        return ArchExport(
            "matching_pursuit",
            {
                "residual_threshold": float(self.residual_threshold or 0.0),
                "max_iterations": int(self.iterations),
                "stop_on_duplicate_support": self.dynamic,
            },
            tied=True,
            input_units=("residual_threshold",),
        )

    def config(self) -> dict:
        return {
            **super().config(),
            "k": self.k,
            "residual_threshold": self.residual_threshold,
            "max_iterations": self.max_iterations,
            **({} if self.unit_norm_decoder else {"free_atom_norms": True}),  # older runs: unit norms
        }


class _PursuitReplay(torch.autograd.Function):
    """Forward: r_0 = x − b_dec; per step t, w = W[j_t], c_t = relu(r_{t−1} · w) · live_t, r_t = r_{t−1} − c_t · w.
    Backward: the steps in reverse, rebuilding r_{t−1} = r_t + c_t · w; with g = ∂L/∂r_t and
    δ = (∂L/∂c_t − g · w) · [c_t > 0]: ∂L/∂W[j_t] += δ · r_{t−1} − c_t · g, ∂L/∂r_{t−1} = g + δ · w
    (docs/architectures.md#mp)."""

    @staticmethod
    def forward(ctx, x, W, b_dec, indices, live):
        r = x - b_dec
        coefs = torch.empty(indices.shape, dtype=r.dtype, device=r.device)
        for t in range(indices.shape[1]):
            w = W.index_select(0, indices[:, t])
            c = torch.linalg.vecdot(r, w).relu_().mul_(live[:, t])
            r.addcmul_(c[:, None], w, value=-1)  # r is this function's own tensor from the start
            coefs[:, t] = c
        ctx.save_for_backward(W, indices, coefs, r)
        return coefs, r.clone()

    @staticmethod
    def backward(ctx, grad_coefs, grad_r):
        W, indices, coefs, r = ctx.saved_tensors
        g = torch.zeros_like(r) if grad_r is None else grad_r.clone()
        grad_W = torch.zeros_like(W)
        r = r.clone()
        for t in reversed(range(indices.shape[1])):
            j, c = indices[:, t], coefs[:, t]
            w = W.index_select(0, j)
            r.addcmul_(c[:, None], w)  # r_{t-1}
            delta = -torch.linalg.vecdot(g, w)
            if grad_coefs is not None:
                delta += grad_coefs[:, t]
            delta *= c > 0
            grad_W.index_add_(0, j, delta[:, None] * r - c[:, None] * g)
            g.addcmul_(delta[:, None], w)
        return g, grad_W, -g.sum(dim=0), None, None


def merge_picks(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> SparseCode:
    """Per-step picks [n, T] -> a SparseCode holding each picked latent once, its coefficients summed
    (differentiably). Slots left over hold value 0 and a latent the row never picked, so no index repeats
    with a nonzero value (SparseCode.dense scatters, it does not add). Width min(T, d_sae)."""
    n, steps = indices.shape
    sorted_idx, order = indices.sort(dim=1)
    sorted_val = values.gather(1, order)
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    slot = first.long().cumsum(dim=1) - 1
    width = min(steps, d_sae)  # distinct picks per row
    merged = torch.zeros(n, width, dtype=values.dtype, device=values.device).scatter_add(1, slot, sorted_val)
    picked = torch.zeros(n, d_sae, dtype=torch.bool, device=indices.device).scatter_(1, indices, True)
    unused = (~picked).byte().argmax(dim=1, keepdim=True)  # first latent the row never picked (if any:
    # when every latent was picked, width == d_sae leaves no padding slot)
    merged_idx = unused.expand(n, width).scatter(1, slot, sorted_idx)
    return SparseCode(merged, merged_idx)
