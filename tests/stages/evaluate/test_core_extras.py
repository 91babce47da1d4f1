"""`--suite core`: weight-space metrics against direct computations, and through `saepipe eval`."""

import json

import numpy as np
import pytest
import torch

from stages.evaluate.core_extras import core_extras, decoder_max_cosine, encoder_decoder_cosine, saebench_core_keys
from stages.saes import TopKSAE
from tests.helpers.cli import run_ok


def test_decoder_max_cosine_finds_each_rows_nearest_other_row():
    torch.manual_seed(0)
    W_dec = torch.randn(5000, 16)  # noqa: N806 - more rows than one block of the cosine matrix
    W_dec[4321] = 3 * W_dec[17] + 0.01 * torch.randn(16)  # a near duplicate, in another block, scaled
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    full = unit @ unit.T
    full.fill_diagonal_(-1)
    torch.testing.assert_close(decoder_max_cosine(W_dec), full.max(dim=1).values)
    assert decoder_max_cosine(W_dec)[17] > 0.999


def test_core_extras_of_an_sae():
    sae = TopKSAE(8, 64, k=4)  # initialized with W_enc = W_decᵀ
    with torch.no_grad():
        sae.W_dec[1], sae.W_enc[:, 1] = sae.W_dec[0], sae.W_enc[:, 0]  # latent 1 duplicates latent 0
    extras = core_extras(sae)
    assert extras["encoder_decoder_cosine_mean"] == pytest.approx(1.0)
    assert extras["duplicate_fraction"] == pytest.approx(2 / 64) and extras["decoder_max_cosine_max"] == pytest.approx(
        1
    )
    with torch.no_grad():
        sae.W_enc.neg_()
    torch.testing.assert_close(encoder_decoder_cosine(sae.W_enc, sae.W_dec), -torch.ones(64))


def test_saebench_core_keys_from_firing_frequencies_and_encoder():
    """SAEBench's calculate_misc_metrics, on hand-set frequencies: 4 of 64 latents alive, firing on 50%, 5%,
    0.5% and 20% of tokens."""
    sae = TopKSAE(8, 64, k=4)
    with torch.no_grad():
        sae.W_enc[:, 1] = 2 * sae.W_enc[:, 0]  # latent 1 reads what latent 0 reads
    density = np.zeros(64)
    density[:4] = [0.5, 0.05, 0.005, 0.2]
    keys = saebench_core_keys(sae, density)
    assert keys["frac_alive"] == 4 / 64
    assert keys["freq_over_1_percent"] == 3 / 64 and keys["freq_over_10_percent"] == 2 / 64
    assert keys["normalized_freq_over_1_percent"] == pytest.approx(0.75 / 0.755)
    assert keys["normalized_freq_over_10_percent"] == pytest.approx(0.7 / 0.755)
    best = decoder_max_cosine(sae.W_enc.T)
    assert best[0] == pytest.approx(1) and keys["average_max_encoder_cosine_sim"] == pytest.approx(float(best.mean()))
    assert saebench_core_keys(sae, np.zeros(64))["normalized_freq_over_1_percent"] == 0.0  # nothing fired


def test_eval_adds_them_with_suite_core(tiny_store, tmp_path):
    run = tmp_path / "run"
    run_ok("train", tiny_store, "--width", 64, "--k", 4, "--tokens", 2048, "--batch-size", 512, "--no-progress",
           "--out", run)  # fmt: skip
    run_ok("eval", run, "--no-model", "--no-progress")
    assert "duplicate_fraction" not in json.loads((run / "eval.json").read_text())
    table = run_ok("eval", run, "--no-model", "--no-progress", "--suite", "core").output
    result = json.loads((run / "eval.json").read_text())
    assert 0 <= result["duplicate_fraction"] <= 1 and -1 <= result["encoder_decoder_cosine_mean"] <= 1
    assert "decoder_max_cosine_mean" in table
    assert result["frac_alive"] == pytest.approx(1 - result["dead_fraction"])
    density = np.load(run / "feature_density.npy")
    assert result["freq_over_1_percent"] == pytest.approx(float((density > 0.01).mean()))
    assert 0 <= result["average_max_encoder_cosine_sim"] <= 1 + 1e-6
    assert result["l1"] > 0  # every eval gives it: the latents' summed activation per token
