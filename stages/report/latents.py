"""The latent browser's data: which latents to show, their top-activating held-out contexts, activation
values and the output tokens each one promotes and suppresses.

Activations come from the SAE applied to the store's eval rows (no model forward); the token text from
the store's `tokens`. Eval rows are stored context by context, so the rows of one context can be put
back at their positions; positions the store does not keep (position 0, special tokens, outliers) show
unshaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from stages.basics.errors import SaepipeError
from stages.basics.settings import progress_setting, refuse_unless, setting
from stages.evaluate import EvaluatedSAE
from stages.saes.base import SparseCode
from store_schema.reader import ActivationStore

WINDOW_BEFORE = 24  # tokens shown before a context's peak
WINDOW_AFTER = 8  # and after it
SCAN_BATCH = 4096  # rows encoded at once (bounds the dense [rows, d_sae] code of dense architectures)


@dataclass
class TokenSpan:
    text: str
    activation: float | None  # None: the store keeps no row at this position


@dataclass
class ContextView:
    context: int  # index into the store's tokens
    peak: float
    peak_position: int
    first_position: int  # of the window shown
    tokens: list[TokenSpan]
    cut_left: bool  # the window starts after the context does
    cut_right: bool


@dataclass
class LatentView:
    latent: int
    reasons: list[str]  # why it is shown: named, top by frequency, random
    density: float | None  # firing fraction on eval tokens
    fired: int  # scanned rows it fired on
    max_activation: float
    values: np.ndarray  # its non-zero activations over the scanned rows
    contexts: list[ContextView] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class LatentBrowser:
    scanned_rows: int
    eval_rows: int
    latents: list[LatentView]
    notes: list[str] = field(default_factory=list)


@dataclass
class BrowseOptions:
    named: tuple[int, ...] = setting(
        (), "latents to show in every run's browser", flag="--latents", metavar="12,345", items="latent indices"
    )
    n_top: int = setting(8, "most frequently firing latents per run", flag="--top")
    n_random: int = setting(8, "randomly chosen latents per run (among those that fire)", flag="--random")
    n_contexts: int = setting(10, "top-activating held-out contexts per latent", flag="--contexts")
    n_logits: int = 10  # promoted and suppressed output tokens shown per latent
    max_rows: int = setting(200_000, "held-out rows scanned for the latent browser")
    seed: int = setting(0, "seed of the random latents")
    progress: bool = progress_setting()

    def __post_init__(self) -> None:
        self.named = tuple(dict.fromkeys(self.named or ()))  # each latent once, in the order given

    def validate(self) -> BrowseOptions:
        for name, minimum in (("n_top", 0), ("n_random", 0), ("n_contexts", 1), ("max_rows", 1)):
            value = getattr(self, name)
            refuse_unless(value >= minimum, self, name, f"must be at least {minimum}, got {value}")
        return self


# -- choosing latents -------------------------------------------------------------------------------


def check_latents(named: tuple[int, ...], d_sae: int, label: str) -> None:
    for latent in named:
        if not 0 <= latent < d_sae:
            raise SaepipeError(f"--latents {latent} is out of range for run {label}: its latents are 0 to {d_sae - 1}")


def choose_latents(density: np.ndarray | None, d_sae: int, opts: BrowseOptions) -> dict[int, list[str]]:
    """latent -> reasons, in display order: named, then most frequent, then random among those that fired
    (a random dead latent would have nothing to show)."""
    chosen: dict[int, list[str]] = {latent: ["named"] for latent in opts.named}
    if density is not None and opts.n_top > 0:
        for latent in np.argsort(-density, kind="stable")[: opts.n_top]:
            if density[latent] > 0:
                chosen.setdefault(int(latent), []).append("top by frequency")
    pool = np.arange(d_sae) if density is None else np.flatnonzero(density > 0)
    pool = np.setdiff1d(pool, np.fromiter(chosen, dtype=np.int64, count=len(chosen)))
    rng = np.random.default_rng(opts.seed)
    for latent in np.sort(rng.choice(pool, size=min(opts.n_random, len(pool)), replace=False)):
        chosen[int(latent)] = ["random"]
    return chosen


# -- scanning eval rows -----------------------------------------------------------------------------


class SaeInputs:
    """Eval rows in the SAE's input space: the stored rows as they are when the store normalizes them
    the SAE's way, else mapped back to raw activations and normalized again. A transcoder's input is its
    read hook's rows."""

    def __init__(self, store: ActivationStore, evaluated: EvaluatedSAE, device: torch.device):
        self.store, self.device = store, device
        self.hooks = evaluated.inputs()  # a transcoder's input hook; a crosscoder's or CLT's, side by side
        self.dtype = next(evaluated.sae.parameters()).dtype

    def read(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([self._read(hook, norm, start, stop) for hook, norm in self.hooks], dim=1).to(self.dtype)

    def _read(self, hook: str, sae_norm, start: int, stop: int) -> torch.Tensor:
        x = torch.from_numpy(self.store.read_rows("eval", hook, start, stop)).to(self.device).float()
        store_norm = self.store.normalization(hook)
        if not store_norm.same_transform(sae_norm):
            stats = self.store.read_row_stats("eval", hook, start, stop)
            stats = None if stats is None else torch.from_numpy(stats).to(self.device)
            x = sae_norm.apply(store_norm.invert(x, stats))[0]
        return x


def _batch_starts(n: int, desc: str, progress: bool):
    return tqdm(range(0, n, SCAN_BATCH), desc=desc, unit="batch", disable=not progress, postfix={"rows": f"{n:,}"})


def scan_density(evaluated: EvaluatedSAE, inputs: SaeInputs, n: int, progress: bool) -> np.ndarray:
    """Firing fraction of every latent over the first n eval rows (for runs evaluated before eval wrote
    feature_density.npy)."""
    sae = evaluated.sae
    fires = torch.zeros(sae.d_sae, dtype=torch.long, device=inputs.device)
    with torch.inference_mode():
        for start in _batch_starts(n, f"{evaluated.label}: feature density", progress):
            fires += sae.encode(inputs.read(start, min(start + SCAN_BATCH, n))).fire_counts(sae.d_sae)
    return fires.double().cpu().numpy() / max(n, 1)


def _selected(code, latents: torch.Tensor, column: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The code's values at `latents` [rows, len(latents)]; a sparse code is never made dense."""
    if isinstance(code, SparseCode):
        cols = column[code.indices]
        keep = cols >= 0
        rows = torch.arange(cols.shape[0], device=cols.device)[:, None].expand_as(cols)
        out = torch.zeros(cols.shape[0], len(latents), device=cols.device)
        return out.index_put_((rows[keep], cols[keep]), code.values[keep].float(), accumulate=True)
    return code.dense(d_sae)[:, latents].float()


def scan_activations(
    evaluated: EvaluatedSAE, inputs: SaeInputs, latents: list[int], n: int, progress: bool
) -> np.ndarray:
    """Activations [len(latents), n] of the chosen latents on the first n eval rows."""
    sae = evaluated.sae
    index = torch.tensor(latents, dtype=torch.long, device=inputs.device)
    column = torch.full((sae.d_sae,), -1, dtype=torch.long, device=inputs.device)
    column[index] = torch.arange(len(latents), device=inputs.device)
    acts = np.zeros((len(latents), n), np.float32)
    with torch.inference_mode():
        for start in _batch_starts(n, f"{evaluated.label}: latent activations", progress):
            stop = min(start + SCAN_BATCH, n)
            code = sae.encode(inputs.read(start, stop))
            acts[:, start:stop] = _selected(code, index, column, sae.d_sae).T.cpu().numpy()
    return acts


# -- contexts -------------------------------------------------------------------------------------


class RowsByContext:
    """The scanned rows grouped by the context they came from."""

    def __init__(self, contexts: np.ndarray, positions: np.ndarray):
        self.ids, inverse = np.unique(contexts, return_inverse=True)
        self.inverse = inverse
        self.positions = positions
        self.order = np.argsort(inverse, kind="stable")
        self.bounds = np.searchsorted(inverse[self.order], np.arange(len(self.ids) + 1))

    def rows(self, group: int) -> np.ndarray:
        return self.order[self.bounds[group] : self.bounds[group + 1]]

    def top_groups(self, acts: np.ndarray, count: int) -> list[int]:
        """Contexts with the highest peak activation (at most `count`, only those where it fired)."""
        peak = np.zeros(len(self.ids), np.float32)
        np.maximum.at(peak, self.inverse, acts)
        top = np.argsort(-peak, kind="stable")[:count]
        return [int(g) for g in top if peak[g] > 0]


class TokenText:
    """Token id -> display text, cached; token ids themselves when there is no tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else f"‹{token}›"
            self.cache[token] = text if text else f"‹{token}›"
        return self.cache[token]


def context_view(
    tokens: np.ndarray, positions: np.ndarray, values: np.ndarray, context: int, text: TokenText
) -> ContextView:
    """A window of one context around its peak, each token with its activation (None where not stored)."""
    by_position = dict(zip(positions.tolist(), values.tolist()))
    peak_position = int(positions[np.argmax(values)])
    first = max(0, peak_position - WINDOW_BEFORE)
    last = min(len(tokens), peak_position + WINDOW_AFTER + 1)
    spans = [TokenSpan(text(int(tokens[p])), by_position.get(p)) for p in range(first, last)]
    return ContextView(context, float(values.max()), peak_position, first, spans, first > 0, last < len(tokens))


# -- output tokens --------------------------------------------------------------------------------


def logit_effects(W_dec_rows: torch.Tensor, W_U: torch.Tensor, count: int, text: TokenText):
    """Per latent: the `count` output tokens its decoder direction raises most and lowers most through
    the unembedding (W_dec[i] @ W_U, the direct path; the final LayerNorm's scale is left out)."""
    logits = W_dec_rows.float() @ W_U.to(W_dec_rows.device).float()
    count = min(count, logits.shape[1])
    top, bottom = logits.topk(count, dim=1), (-logits).topk(count, dim=1)
    out = []
    for i in range(logits.shape[0]):
        promoted = [(text(int(t)), float(v)) for v, t in zip(top.values[i], top.indices[i])]
        suppressed = [(text(int(t)), -float(v)) for v, t in zip(bottom.values[i], bottom.indices[i])]
        out.append((promoted, suppressed))
    return out


# -- the browser ----------------------------------------------------------------------------------


def browse(
    evaluated: EvaluatedSAE,
    store: ActivationStore,
    density: np.ndarray | None,
    opts: BrowseOptions,
    model_for: Callable[[str], object] | None,
    device: torch.device,
) -> tuple[LatentBrowser, np.ndarray | None]:
    """The browser of one run, and the per-latent firing fractions (scanned here when not given)."""
    sae = evaluated.sae
    check_latents(opts.named, sae.d_sae, evaluated.label)
    n = min(opts.max_rows, store.n_rows("eval"))
    if n == 0:
        raise SaepipeError(f"store {store.location} has no held-out rows to browse: collect with --eval-fraction > 0")
    inputs = SaeInputs(store, evaluated, device)
    notes = []
    if density is None:
        density = scan_density(evaluated, inputs, n, opts.progress)
        notes.append(f"no feature_density.npy beside eval.json: firing fractions are from the {n:,} scanned rows")
    chosen = choose_latents(density, sae.d_sae, opts)
    latents = list(chosen)
    if not latents:  # no latent fired on the scanned rows and none was named: nothing to show
        notes.append(f"no latent fired on the {n:,} scanned eval rows: the browser is empty")
        return LatentBrowser(n, store.n_rows("eval"), [], notes), density
    acts = scan_activations(evaluated, inputs, latents, n, opts.progress)
    grouped = RowsByContext(*store.read_mapping("eval", 0, n))

    model = model_for(evaluated.model_name) if model_for is not None else None
    text = TokenText(model.tokenizer if model is not None else None)
    if model is None:
        notes.append("--no-model: tokens are shown as ids and the output-token tables are left out")

    tops = {latent: grouped.top_groups(acts[j], opts.n_contexts) for j, latent in enumerate(latents)}
    needed = sorted({int(grouped.ids[g]) for groups in tops.values() for g in groups})
    token_rows = dict(zip(needed, store.tokens.oindex[needed, :])) if needed else {}

    views = []
    for j, latent in enumerate(latents):
        values = acts[j][acts[j] > 0]
        view = LatentView(
            latent,
            chosen[latent],
            float(density[latent]),
            int(len(values)),
            float(values.max()) if len(values) else 0.0,
            values,
        )
        for g in tops[latent]:
            rows = grouped.rows(g)
            context = int(grouped.ids[g])
            view.contexts.append(
                context_view(token_rows[context], grouped.positions[rows], acts[j, rows], context, text)
            )
        views.append(view)

    if model is not None:
        W_U = model.bridge.W_U.detach()
        writes = sae.W_dec.shape[1] if evaluated.io.single else None  # d_in, or a transcoder's d_out
        if writes is None:
            notes.append(f"a {sae.arch}'s latents write into several hooks: output-token tables left out")
        elif W_U.shape[0] != writes:
            notes.append(
                f"the model's unembedding takes {W_U.shape[0]} dimensions, the SAE's decoder writes "
                f"{writes}: output-token tables left out"
            )
        else:
            rows = sae.W_dec.detach()[torch.tensor(latents, device=sae.W_dec.device)]
            for view, (promoted, suppressed) in zip(views, logit_effects(rows, W_U, opts.n_logits, text)):
                view.promoted, view.suppressed = promoted, suppressed
    return LatentBrowser(n, store.n_rows("eval"), views, notes), density
