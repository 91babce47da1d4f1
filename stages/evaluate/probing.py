"""k-sparse probing (Gao et al. 2024; Gurnee et al. 2023; SAEBench's `sparse_probing`): how much of a
text's class k latents carry.

For each text: the model runs on it (BOS first, cut at the store's context size), the hook's activation at
every position the store would keep is encoded by the SAE, and the latents are mean-pooled over the text
(encode, then pool). Each class gives one binary task, the class against the others, balanced and split
into train and test. On the train part the k latents with the largest |mean difference| between the two
sides are chosen, a logistic regression is fit on them, and its test accuracy is reported, for k = 1, 2
and 5; the same procedure on the model's own dimensions (its mean-pooled raw activations) is the
baseline. The selection and the probe are SAEBench 0.6.0's (`get_top_k_mean_diff_mask`,
`train_sklearn_probe`: scikit-learn's L2 logistic regression with C = 1 on the features as they are),
the regression minimized here by L-BFGS.

Definitions, the default task and its cost: docs/metrics.md#k-sparse-probing
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from tqdm import tqdm

from stages.basics.errors import SaepipeError
from stages.evaluate.downstream import positions_kept
from stages.evaluate.evaluated import EvaluatedSAE
from stages.host_model.model import run_to_hooks
from stages.text.probing_tasks import ProbingData
from store_schema.reader import ActivationStore

K_VALUES = (1, 2, 5)
PER_CLASS = 120  # texts of each class used: 2/3 to train, 1/3 to test
MIN_PER_CLASS = 12
BATCH = 16


@dataclass
class ProbingTexts:
    """The model's side of a probing task at one hook, which no SAE changes: the hook's raw activation at
    every kept position of the chosen texts, the text each row belongs to, and each text's label and part.
    Built once, it scores any number of SAEs of that hook (`probing_scores`)."""

    task: str
    classes: list[str]
    rows: torch.Tensor  # [n_rows, d] raw activations, on the CPU
    owner: torch.Tensor  # [n_rows] the index of each row's text
    labels: np.ndarray  # [n_texts]
    is_train: np.ndarray  # [n_texts]
    seed: int

    def pooled(self, features_of=lambda rows: rows, chunk: int = 4096) -> torch.Tensor:
        """`features_of` each kept row (the raw row itself by default), mean-pooled over each text:
        [n_texts, features]. A chunk of rows at a time, so an SAE's dense codes of every row are never
        held at once."""
        sums = None
        for rows, owner in zip(self.rows.split(chunk), self.owner.split(chunk)):
            features = features_of(rows)
            sums = torch.zeros(len(self.labels), features.shape[1]) if sums is None else sums
            sums.index_add_(0, owner, features)
        counts = torch.bincount(self.owner, minlength=len(self.labels)).clamp_min(1)[:, None].float()
        return sums / counts

    @cached_property
    def raw_pooled(self) -> torch.Tensor:
        """The model's own dimensions, mean-pooled: the baseline every SAE is set beside."""
        return self.pooled()


def probing_texts(
    hook: str, norm, store: ActivationStore, model, data: ProbingData, device, seed: int = 0, progress: bool = True
) -> ProbingTexts:
    """Runs the model on the task's chosen texts and keeps the rows the store would keep (and `norm` would
    call inliers)."""
    classes = probing_classes(data)
    chosen, split = _chosen_texts(data, classes, seed)
    rows, owner = kept_rows(hook, norm, store, model, [data.texts[i] for i in chosen], device, progress)
    labels = np.array([data.labels[i] for i in chosen])
    return ProbingTexts(data.name, classes, rows, owner, labels, split, seed)


def sparse_probing(
    evaluated: EvaluatedSAE,
    store: ActivationStore,
    model,
    data: ProbingData,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Test accuracies of the k-sparse probes on the SAE's latents and on the model's dimensions, per class
    and averaged over the classes (`probing` in eval.json)."""
    if not evaluated.io.single:
        raise SaepipeError(f"k-sparse probing reads one hook; a {evaluated.sae.arch} reads several")
    [(hook, norm)] = evaluated.inputs()
    texts = probing_texts(hook, norm, store, model, data, device, seed, progress)
    return probing_scores(evaluated.sae, norm, texts, device)


@torch.no_grad()
def probing_scores(sae, norm, texts: ProbingTexts, device) -> dict:
    """An SAE's k-sparse probing on built texts; `norm` maps the hook's raw rows to the SAE's input."""
    dtype = next(sae.parameters()).dtype

    def codes(rows: torch.Tensor) -> torch.Tensor:
        return sae.encode(norm.apply(rows.to(device))[0].to(dtype)).dense(sae.d_sae).float().cpu()

    latents, raw = texts.pooled(codes), texts.raw_pooled
    labels = texts.labels
    per_class = {}
    rng = np.random.default_rng(texts.seed)
    for label in texts.classes:
        train, test = _balanced(labels, texts.is_train, label, rng)
        per_class[label] = {
            **{f"sae_top_{k}": _probe_accuracy(latents, labels == label, train, test, k) for k in K_VALUES},
            **{f"model_top_{k}": _probe_accuracy(raw, labels == label, train, test, k) for k in K_VALUES},
        }
    keys = list(next(iter(per_class.values())))
    return {
        "task": texts.task,
        "classes": len(texts.classes),
        "texts": len(labels),
        **{f"{key}_accuracy": float(np.mean([c[key] for c in per_class.values()])) for key in keys},
        "per_class": per_class,
    }


def probing_classes(data: ProbingData) -> list[str]:
    """The classes with at least MIN_PER_CLASS texts; refused unless there are two or more."""
    counts = Counter(data.labels)
    classes = sorted(label for label, n in counts.items() if n >= MIN_PER_CLASS)
    if len(classes) < 2:
        raise SaepipeError(
            f"--probe-data {data.name} has {len(classes)} class(es) with at least {MIN_PER_CLASS} texts: "
            f"probing needs two or more"
        )
    return classes


def _chosen_texts(data: ProbingData, classes: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to PER_CLASS texts of each class (a seeded shuffle) and whether each is in the train part."""
    rng = np.random.default_rng(seed)
    labels = np.array(data.labels)
    chosen, is_train = [], []
    for label in classes:
        mine = rng.permutation(np.flatnonzero(labels == label))[:PER_CLASS]
        n_train = (2 * len(mine)) // 3
        chosen.extend(mine.tolist())
        is_train.extend([True] * n_train + [False] * (len(mine) - n_train))
    return np.array(chosen), np.array(is_train)


def _balanced(labels: np.ndarray, is_train: np.ndarray, label: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the binary task `label` against the rest: every text of the class in each part, and as
    many of the other classes', drawn at random."""
    parts = []
    for in_part in (is_train, ~is_train):
        positive = np.flatnonzero(in_part & (labels == label))
        others = np.flatnonzero(in_part & (labels != label))
        parts.append(
            np.concatenate([positive, rng.choice(others, size=min(len(positive), len(others)), replace=False)])
        )
    return parts[0], parts[1]


@torch.no_grad()
def kept_rows(
    hook: str, norm, store: ActivationStore, model, texts: list[str], device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the hook's raw activations at every position of a text the store would keep and `norm` calls an
    inlier [n_rows, d], the index of each row's text [n_rows]), on the CPU."""
    bos = store.header.tokenizer.bos_token_id
    ids = [[bos, *model.tokenizer.encode(text)][: store.context_size] for text in texts]
    rows_out, owner_out = [], []
    for start in tqdm(range(0, len(ids), BATCH), desc="probing texts", disable=not progress, leave=False):
        batch = ids[start : start + BATCH]
        token_ids = padded(batch, bos)
        width = token_ids.shape[1]
        acts = run_to_hooks(model, torch.from_numpy(token_ids).to(device), [hook])[hook]
        kept = torch.from_numpy(positions_kept(store, token_ids)).to(device) & norm.inliers(acts)
        kept &= (
            torch.arange(width, device=device)[None, :] < torch.tensor([len(r) for r in batch], device=device)[:, None]
        )
        rows_out.append(acts[kept].float().cpu())
        owner_out.append(kept.nonzero()[:, 0].cpu() + start)
    return torch.cat(rows_out), torch.cat(owner_out)


def padded(rows: list[list[int]], pad: int) -> np.ndarray:
    """Token id rows of different lengths as one int64 array [n, longest], `pad` after each row's end (the
    model is causal: what follows a position never changes its activation)."""
    out = np.full((len(rows), max(len(row) for row in rows)), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def top_k_by_mean_difference(features: torch.Tensor, positive: torch.Tensor, k: int) -> torch.Tensor:
    """The k features whose mean differs most, in absolute value, between the positive and negative rows."""
    difference = features[positive].mean(dim=0) - features[~positive].mean(dim=0)
    return difference.abs().topk(k).indices


def _probe_accuracy(features: torch.Tensor, is_class: np.ndarray, train, test, k: int) -> float:
    y = torch.from_numpy(is_class)
    chosen = top_k_by_mean_difference(features[train], y[train], k)
    model = fit_logistic_regression(features[train][:, chosen], y[train])
    return float((model(features[test][:, chosen]) == y[test]).float().mean())


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 1000, sample_weight: torch.Tensor | None = None
):
    """SAEBench's probe, scikit-learn's `LogisticRegression(penalty="l2", C=1.0, max_iter=1000)` on the
    features as they are: minimize C · Σ s_i log-loss_i + ½‖w‖² (the bias not penalized; s_i the sample
    weights, scikit-learn's class_weight) with L-BFGS, in float64. Returns a predict function."""
    x, target = x.double(), y.double()
    weight = None if sample_weight is None else sample_weight.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = c * torch.nn.functional.binary_cross_entropy_with_logits(
            x @ w + b, target, weight=weight, reduction="sum"
        )
        loss = loss + 0.5 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    w, b = w.detach(), b.detach()
    return lambda features: features.double() @ w + b > 0
