"""Feature absorption (`--suite absorption`), SAEBench 0.6.0's definition: the per-word rules on the
hand-built cases that pin them (main latent alone, one or two absorbers, a partial split, a low-cosine
latent), the F1-jump choice of main latents, and the refusals."""

import pytest
import torch

from stages.evaluate.absorption import (
    LETTERS,
    FirstLetterTask,
    Word,
    absorption_fraction,
    absorption_scores,
    f1,
    full_absorption,
    main_latents,
    prompt,
    train_letter_probe,
)
from stages.saes.topk import TopKSAE
from store_schema.normalization import Normalization
from tests.helpers.cli import expect_error, run, run_ok

D = 16


@pytest.fixture(scope="module")
def decoder():
    """Latent 0 is the letter's main latent (the probe's direction), 1 and 2 absorbers at cosine 0.6, 3 a
    latent at cosine 0.05 (below the absorbers' 0.1)."""
    u = torch.linalg.qr(torch.randn(D, 4, generator=torch.Generator().manual_seed(0)))[0].T
    rows = torch.stack(
        [u[0], 0.6 * u[0] + 0.8 * u[1], 0.6 * u[0] + 0.8 * u[2], 0.05 * u[0] + (1 - 0.05**2) ** 0.5 * u[3]]
    )
    return u[0], rows / rows.norm(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "codes, fraction, full",
    [
        ([2.0, 0, 0, 0], 0.0, False),  # the main latent carries it all
        ([0, 2.0, 0, 0], 1.0, True),  # one absorber, the main latent off
        ([1.0, 2.0, 0, 0], 1.2 / 2.2, False),  # main 1.0 and an absorber's 1.2 of the projection
        ([0, 1.0, 1.0, 0], 1.0, True),  # two absorbers, main off
        ([0, 0, 0, 2.0], 0.0, True),  # only a latent below the absorbers' cosine, above full absorption's
    ],
)
def test_the_per_word_rules(decoder, codes, fraction, full):
    direction, rows = decoder
    acts = torch.tensor(codes)
    x = acts @ rows  # an exact SAE: the activation is its code's decoding
    cos = torch.nn.functional.cosine_similarity(rows, direction[None, :], dim=1)
    proj, act_proj = acts * cos, float(x @ direction)
    assert absorption_fraction(proj, cos, [0], act_proj) == pytest.approx(fraction, abs=1e-6)
    assert full_absorption(acts, proj, cos, [0], act_proj) == full


def test_main_latents_grow_while_f1_jumps():
    torch.manual_seed(0)
    y = torch.arange(400) % 2 == 0
    codes = torch.rand(400, 20) * 0.1
    codes[:, 3] += y * (torch.rand(400) > 0.3)  # latent 3 fires on 70% of the class
    codes[:, 8] += y * (codes[:, 3] < 0.1)  # latent 8 on the rest: together they cover it
    ranking = torch.zeros(20)
    ranking[3], ranking[8], ranking[5] = 3.0, 2.0, 1.0  # the sparse probe's order: 3, then 8, then noise
    chosen, scores = main_latents(codes[:300], codes[300:], y[:300], y[300:], ranking)
    assert chosen == [3, 8] and scores[1] > scores[0] + 0.03 and len(scores) == 3


def test_the_prompt_is_saebenchs_template():
    head, rest = prompt(Word(" cat", LETTERS.index("c")), [Word(" dog", 3), Word("Bird", 1)])
    assert head + rest == "\n dog has the first letter: D\nBird has the first letter: B\n cat has the first letter:"
    assert head.endswith(" cat")


def test_a_tokenizer_without_enough_letter_only_tokens_is_refused(tiny_store, tmp_path):
    folder = tmp_path / "run"
    run_ok("train", tiny_store, "--width", 64, "--k", 4, "--tokens", 2048, "--batch-size", 512, "--no-progress",
           "--out", folder)  # fmt: skip
    expect_error(
        run("eval", folder, "--tokens", 64, "--ablation-contexts", 0, "--suite", "absorption"),
        "letter-only tokens over",
        "absorption needs at least 200 over 20 letters",
    )
    expect_error(run("eval", folder, "--suite", "absorption", "--no-model"), "--suite absorption runs the model")


def synthetic_task(absorbed_words: int) -> tuple[FirstLetterTask, torch.Tensor]:
    """A first-letter task in 64 dimensions: each letter a unit direction, each word 3x its letter's plus
    noise. Letter a's scored words (the fresh-prompt rows) carry a token direction v too, the first
    `absorbed_words` of its 12 with weight 3. Returns the task and the directions [27, 64] (26 letters, v)."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(64, 27, generator=generator))[0].T

    def words(n_per_letter: int) -> tuple[torch.Tensor, torch.Tensor]:
        letters = torch.arange(26).repeat_interleave(n_per_letter)
        return 3 * directions[letters] + 0.1 * torch.randn(len(letters), 64, generator=generator), letters

    (x_train, y_train), (x_test, y_test) = words(48), words(12)
    probe = train_letter_probe(x_train, y_train)
    with torch.no_grad():
        probe_f1 = [f1(probe(x_test)[:, c] > 0, y_test == c) for c in range(26)]
    scored = {c: x_test[y_test == c] for c in range(26)}
    scored[0] = scored[0].clone()
    scored[0][:absorbed_words] += 3 * directions[26]
    return FirstLetterTask(
        "synthetic", 26 * 60, x_train, x_test, y_train, y_test, probe, probe_f1, scored, 0
    ), directions


def exact_sae(dictionary: torch.Tensor, width: int = 2048) -> TopKSAE:
    """A TopK (k = 1) SAE whose live latents are the unit rows of `dictionary`, encoder tied to the decoder,
    padded to `width` with latents that never fire. The padding matters: SAEBench's sparse probe takes 50
    Adam steps (lr 1e-2 decaying) from nn.Linear's init, U(±1/√width), which only a wide SAE's init leaves
    small beside what those steps learn."""
    padding = torch.randn(width - len(dictionary), dictionary.shape[1], generator=torch.Generator().manual_seed(1))
    rows = torch.cat([dictionary, padding])
    sae = TopKSAE(dictionary.shape[1], width, k=1)
    with torch.no_grad():
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_enc[len(dictionary) :] = -100.0
        sae.b_dec.zero_()
    return sae


def test_a_token_latent_firing_in_place_of_its_letters_is_absorption():
    """Letter a's main latent is found on the train and test words; on half its scored words a latent of
    a's direction plus a token direction fires instead (it wins the top 1), and absorbs the letter there."""
    task, directions = synthetic_task(absorbed_words=6)
    identity = Normalization("none")
    letters_only = absorption_scores(exact_sae(directions[:26]), identity, task, "cpu")
    assert letters_only["mean_absorption_fraction_score"] == 0 and letters_only["mean_full_absorption_score"] == 0
    assert letters_only["letters"] == 26 and letters_only["mean_num_split_features"] == 1

    absorber = directions[0] + directions[26]
    absorbing = absorption_scores(exact_sae(torch.cat([directions[:26], absorber[None]])), identity, task, "cpu")
    a = absorbing["per_letter"]["a"]
    assert a["main_latents"] == [0] and a["words"] == 12
    assert a["absorption_fraction"] == pytest.approx(0.5) and a["full_absorption_rate"] == pytest.approx(0.5)
    assert all(s["absorption_fraction"] == 0 for letter, s in absorbing["per_letter"].items() if letter != "a")
    assert absorbing["mean_absorption_fraction_score"] == pytest.approx(0.5 / 26)
