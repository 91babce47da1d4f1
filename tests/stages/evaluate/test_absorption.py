"""Feature absorption (`--suite absorption`), SAEBench 0.6.0's definition: the per-word rules on the
hand-built cases that pin them (main latent alone, one or two absorbers, a partial split, a low-cosine
latent), the F1-jump choice of main latents, and the refusals."""

import pytest
import torch

from stages.evaluate.absorption import LETTERS, Word, absorption_fraction, full_absorption, main_latents, prompt
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
