"""Feature absorption (Chanin et al., "A is for Absorption", 2024), the first-letter task as SAEBench 0.6.0
computes it (its `evals/absorption`, whose definition changed in its PR #62: thresholds on the absorbers'
cosine and share, at most three absorbers; 0.6.0 computes what 0.4.1 introduced).

1. Words: the tokenizer's tokens that are letters only (one leading space allowed), a seeded sample of
   `max_words` of them, 80% to train and 20% to test.
2. Prompts: ten in-context examples of `{word} has the first letter: {LETTER}` from the same split, then
   `{word} has the first letter:`; the model's activation at the word's token, at the SAE's hook.
3. Ground-truth probe: 26 one-vs-rest logistic outputs on those activations (Adam, lr 1e-2 decaying to
   1e-5 over 50 epochs, weight decay 1e-4, batches of 64, each letter weighted by its negatives over its
   positives). Letters whose test F1 is not above 0.6 are left out; fewer than 20 left is refused.
4. k-sparse probing on the SAE's codes: an L1-penalized probe of the same kind ranks each letter's latents
   by its weights; for k = 1 .. 10 a class-balanced logistic regression on the top k gives a test F1,
   and k grows while F1 improves by more than 0.03: those latents are the letter's main latents.
5. Absorption, per test word the probe gets right: in a fresh prompt (examples from the whole sample),
   with p̂ the probe's unit direction, proj_i = a_i · cos(p̂, W_dec,i) and the activation's projection
   x · p̂: the main latents' share, and what at most three other latents with cos >= 0.1 and proj > 0
   (absorbers) carry. The absorption fraction and full absorption follow SAEBench's rules (in
   `absorption_fraction` and `full_absorption` below).

What differs from SAEBench, and why: docs/metrics.md#absorption
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from stages.basics.errors import SaepipeError
from stages.evaluate.evaluated import EvaluatedSAE
from stages.evaluate.probing import fit_logistic_regression, padded
from stages.host_model.model import run_to_hooks

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"
ICL_EXAMPLES = 10
TRAIN_FRACTION = 0.8
MIN_PROBE_F1 = 0.6  # letters whose ground-truth probe scores no better are left out
MIN_LETTERS = 20  # fewer letters left: no absorption score
MAX_K = 10
F1_JUMP = 0.03  # k grows while the k-sparse probe's F1 improves by more than this
ABSORBER_COSINE = 0.1  # an absorber's decoder row has at least this cosine with the probe
ABSORBER_SHARE = 0.4  # absorbers carry at least this share of the projection
MAX_ABSORBERS = 3
FULL_ABSORBER_COSINE = 0.025
MAIN_ZERO = 1e-8
BATCH = 32


@dataclass(frozen=True)
class Word:
    text: str  # the token's text, leading space included, as it goes into the prompt
    letter: int  # index into LETTERS


def letter_words(tokenizer, vocab_size: int) -> list[Word]:
    """The tokens whose text is letters only (after one leading space), labelled by their first letter."""
    words = []
    for token_id in range(vocab_size):
        text = tokenizer.decode([token_id])
        if re.fullmatch(r"[a-zA-Z]+", text.removeprefix(" ")):
            words.append(Word(text, LETTERS.index(text.removeprefix(" ")[0].lower())))
    return words


def prompt(word: Word, examples: list[Word]) -> tuple[str, str]:
    """(the prompt up to and including the word, the rest of the question): ICL lines, then the question."""
    lines = [TEMPLATE.format(word=e.text) + f" {LETTERS[e.letter].upper()}" for e in examples]
    return "\n" + "\n".join(lines) + "\n" + word.text, TEMPLATE.removeprefix("{word}")


def word_activations(
    hook: str, model, bos: int, words: list[Word], pool: list[Word], rng, progress: bool, device
) -> torch.Tensor:
    """The hook's raw activation at each word's token in its prompt [n, d] (examples drawn from `pool`)."""
    out = []
    for start in tqdm(range(0, len(words), BATCH), desc="absorption prompts", disable=not progress, leave=False):
        rows, positions = [], []
        for word in words[start : start + BATCH]:
            examples = [pool[i] for i in rng.choice(len(pool), size=ICL_EXAMPLES, replace=False)]
            head, _ = prompt(word, examples)
            # Up to the word only: the model is causal, so the question's rest never reaches the word's
            # activation. Tokenized on its own, the prompt's head ends with the word's last token.
            rows.append([bos, *model.tokenizer.encode(head)])
            positions.append(len(rows[-1]) - 1)
        acts = run_to_hooks(model, torch.from_numpy(padded(rows, bos)).to(device), [hook])[hook]
        out.append(acts[torch.arange(len(rows)), torch.tensor(positions)].cpu())
    return torch.cat(out)


def train_letter_probe(
    x: torch.Tensor, letters: torch.Tensor, l1: float = 0.0, batch_size: int = 64, epochs: int = 50, seed: int = 0
) -> torch.nn.Linear:
    """26 one-vs-rest logistic outputs (SAEBench's `train_multi_probe`; with `l1`, its sparse probe):
    BCE with each letter weighted by negatives over positives, Adam lr 1e-2 decaying to 1e-5, weight decay
    1e-4 (1e-6 and an L1 penalty for the sparse probe)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.nn.functional.one_hot(letters, len(LETTERS)).float()
    positives = targets.sum(dim=0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(len(x) - positives) / positives.clamp_min(1))
    probe = torch.nn.Linear(x.shape[1], len(LETTERS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe.reset_parameters()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-6 if l1 else 1e-4)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=(1e-5 / 1e-2) ** (1 / epochs))
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                optimizer.zero_grad()
                loss = loss_fn(probe(x[batch]), targets[batch])
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(dim=-1).mean()
                loss.backward()
                optimizer.step()
            schedule.step()
    return probe.eval()


def f1(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    tp = float((predicted & actual).sum())
    return 0.0 if tp == 0 else 2 * tp / (float(predicted.sum()) + float(actual.sum()))


def main_latents(codes_train, codes_test, y_train, y_test, ranking: torch.Tensor) -> tuple[list[int], list[float]]:
    """The letter's main latents: the top k of `ranking` (the sparse probe's weights), k growing while a
    class-balanced logistic regression on them gains more than F1_JUMP in test F1. Also every k's F1."""
    chosen, best, scores = [], -100.0, []
    for k in range(1, MAX_K + 1):
        latents = ranking.topk(k).indices
        weight = torch.where(y_train, 0.5 / y_train.float().mean(), 0.5 / (~y_train).float().mean())
        predict = fit_logistic_regression(codes_train[:, latents], y_train, sample_weight=weight, max_iter=500)
        score = f1(predict(codes_test[:, latents]), y_test)
        scores.append(score)
        if score <= best + F1_JUMP:
            break
        best, chosen = score, latents.tolist()
    return chosen, scores


def absorption_fraction(proj: torch.Tensor, cos: torch.Tensor, main: list[int], act_proj: float) -> float:
    """SAEBench's absorption fraction of one word: 0 when the main latents carry the projection or the
    absorbers carry less than ABSORBER_SHARE of it; 1 when the main latents carry nothing; else the
    absorbers' part A = min(their top-3 sum, what the main latents miss) over A + the main part."""
    if act_proj <= 0:  # nothing along the probe to absorb (SAEBench: 0 below zero, a division by zero at it)
        return 0.0
    is_main = torch.zeros(len(proj), dtype=torch.bool)
    is_main[main] = True
    main_part = float(proj[is_main].sum())
    absorbers = proj[~is_main & (cos >= ABSORBER_COSINE) & (proj > 0)]
    absorbed = float(absorbers.topk(min(MAX_ABSORBERS, len(absorbers))).values.sum()) if len(absorbers) else 0.0
    if main_part >= act_proj or absorbed / act_proj < ABSORBER_SHARE:
        return 0.0
    if main_part <= 0:
        return 1.0
    part = min(absorbed, act_proj - main_part)
    return float(np.clip(part / (part + main_part), 0.0, 1.0))


def full_absorption(
    acts: torch.Tensor, proj: torch.Tensor, cos: torch.Tensor, main: list[int], act_proj: float
) -> bool:
    """SAEBench's full absorption of one word: no main latent fires, and the latent projecting most onto the
    probe has cosine >= 0.025 with it and carries at least ABSORBER_SHARE of the projection."""
    if bool((acts[main] >= MAIN_ZERO).any()) or act_proj <= 0:  # SAEBench divides by zero at 0
        return False
    top = int(proj.argmax())
    return float(cos[top]) >= FULL_ABSORBER_COSINE and float(proj[top]) / act_proj >= ABSORBER_SHARE


@dataclass
class FirstLetterTask:
    """The model's side of the task at one hook, which no SAE changes: the words' activations, the
    ground-truth probe, the letters it scores, and each letter's scored test words (their activations in
    fresh prompts). Built once, it scores any number of SAEs of that hook (`absorption_scores`)."""

    hook: str
    words: int
    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor
    y_test: torch.Tensor
    probe: torch.nn.Linear
    probe_f1: list[float]
    scored: dict[int, torch.Tensor]  # letter -> raw activations of the test words the probe gets right
    seed: int


def first_letter_task(
    model, hook: str, bos: int, device, max_words: int = 4000, seed: int = 0, progress: bool = True
) -> FirstLetterTask:
    """Runs the model on the task's prompts and fits the ground-truth probe (steps 1-3, and step 5's prompts)."""
    vocab = letter_words(model.tokenizer, model.d_vocab)
    letters_present = {w.letter for w in vocab}
    if len(vocab) < 10 * MIN_LETTERS or len(letters_present) < MIN_LETTERS:
        raise SaepipeError(
            f"the tokenizer of {model.name} has {len(vocab)} letter-only tokens over {len(letters_present)} first "
            f"letters: absorption needs at least {10 * MIN_LETTERS} over {MIN_LETTERS} letters"
        )
    rng = np.random.default_rng(seed)
    words = [vocab[i] for i in rng.permutation(len(vocab))[:max_words]]
    n_train = int(len(words) * TRAIN_FRACTION)
    train, test = words[:n_train], words[n_train:]
    x_train = word_activations(hook, model, bos, train, train, rng, progress, device)
    x_test = word_activations(hook, model, bos, test, test, rng, progress, device)
    y_train = torch.tensor([w.letter for w in train])
    y_test = torch.tensor([w.letter for w in test])
    probe = train_letter_probe(x_train, y_train, seed=seed)
    with torch.no_grad():
        test_logits = probe(x_test)
    probe_f1 = [f1(test_logits[:, c] > 0, y_test == c) for c in range(len(LETTERS))]
    kept = [c for c in range(len(LETTERS)) if probe_f1[c] > MIN_PROBE_F1]
    if len(kept) < MIN_LETTERS:
        raise SaepipeError(
            f"the first-letter probe on {hook} reaches F1 > {MIN_PROBE_F1} for {len(kept)} letters, fewer "
            f"than {MIN_LETTERS}: this hook of {model.name} does not carry first letters well enough to measure absorption"
        )
    scored = {}
    for c in kept:
        right = [w for w, logit in zip(test, test_logits[:, c]) if w.letter == c and logit > 0]
        if right:
            scored[c] = word_activations(hook, model, bos, right, words, rng, False, device)
    return FirstLetterTask(hook, len(words), x_train, x_test, y_train, y_test, probe, probe_f1, scored, seed)


def absorption(
    evaluated: EvaluatedSAE, model, bos: int, device, max_words: int = 4000, seed: int = 0, progress: bool = True
) -> dict:
    """The absorption metrics of eval.json's `absorption`."""
    if evaluated.io.transcodes or not evaluated.io.single:
        raise SaepipeError(f"absorption probes the hook an SAE reconstructs; a {evaluated.sae.arch} writes another")
    task = first_letter_task(model, evaluated.hook, bos, device, max_words, seed, progress)
    return absorption_scores(evaluated.sae, evaluated.normalization, task, device)


def absorption_scores(sae, norm, task: FirstLetterTask, device) -> dict:
    """An SAE's absorption on a built task (steps 4 and 5); `norm` maps the hook's raw rows to its input."""
    dtype = next(sae.parameters()).dtype

    def codes(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae.encode(norm.apply(x.to(device))[0].to(dtype)).dense(sae.d_sae).float().cpu()

    y_train, y_test = task.y_train, task.y_test
    codes_train, codes_test = codes(task.x_train), codes(task.x_test)
    sparse = train_letter_probe(codes_train, y_train, l1=0.01, batch_size=4096, seed=task.seed)
    W_dec = sae.W_dec.detach().float().cpu()  # noqa: N806
    per_letter = {}
    for c, x in task.scored.items():
        main, f1_by_k = main_latents(codes_train, codes_test, y_train == c, y_test == c, sparse.weight[c].detach())
        direction = task.probe.weight[c].detach() / task.probe.weight[c].detach().norm()
        cos = torch.nn.functional.cosine_similarity(W_dec, direction[None, :], dim=1)
        a = codes(x)
        fractions, full = [], 0
        for acts, row in zip(a, x):
            act_proj = float(row @ direction)
            proj = acts * cos
            fractions.append(absorption_fraction(proj, cos, main, act_proj))
            full += full_absorption(acts, proj, cos, main, act_proj)
        per_letter[LETTERS[c]] = {
            "probe_f1": task.probe_f1[c],
            "words": len(x),
            "main_latents": main,
            "k_sparse_f1": f1_by_k,
            "absorption_fraction": float(np.mean(fractions)),
            "full_absorption_rate": full / len(x),
        }
    scores = list(per_letter.values())

    def mean_and_std(key):
        values = [s[key] for s in scores]
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    fraction, fraction_std = mean_and_std("absorption_fraction")
    full_rate, full_std = mean_and_std("full_absorption_rate")
    return {
        "mean_absorption_fraction_score": fraction,
        "std_dev_absorption_fraction_score": fraction_std,
        "mean_full_absorption_score": full_rate,
        "std_dev_full_absorption_score": full_std,
        "mean_num_split_features": float(np.mean([len(s["main_latents"]) for s in scores])),
        "letters": len(scores),
        "words": task.words,
        "per_letter": per_letter,
    }
