"""Eval's metric definitions (docs/metrics.md): the accumulators against direct formulas and SAELens's
own calculators, ablation sparsity's normalization, splicing from a position, and external SAEs
measured on our store."""

import json
import shutil

import numpy as np
import pytest
import torch

from stages.evaluate import ablation
from stages.evaluate.accumulators import ReconstructionStats, SparsityStats
from stages.saes.base import DenseCode
from store_schema.normalization import Normalization
from tests.helpers.cli import HOOK, collect_args, run, run_catching

COLLECT = collect_args(6000, eval_fraction=0.2)


def test_reconstruction_stats_follow_their_definitions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=gen) * 2 + 5  # a large mean, as residual streams have
    x_hat = x + 0.3 * torch.randn(3000, 16, generator=gen)
    batches = [slice(0, 1000), slice(1000, 2500), slice(2500, 3000)]
    stats = ReconstructionStats(16, torch.device("cpu"))
    for rows in batches:
        stats.add(x[rows], x_hat[rows])
    m = stats.result("raw_")
    x64, h64 = x.double(), x_hat.double()
    err = (h64 - x64).pow(2).sum(dim=1)
    total_var = (x64 - x64.mean(dim=0)).pow(2).sum()
    assert m["raw_mse"] == pytest.approx(float(err.mean() / 16))
    assert m["raw_mse_per_token"] == pytest.approx(float(err.mean()))
    assert m["raw_fve"] == pytest.approx(1 - float(err.sum() / total_var))
    assert m["raw_fve_vs_zero"] == pytest.approx(1 - float(err.sum() / x64.pow(2).sum()))
    assert m["raw_relative_reconstruction_bias"] == pytest.approx(
        float(h64.pow(2).sum(1).mean() / (x64 * h64).sum(1).mean())
    )
    # per token, against each batch's own mean (the three batches above)
    legacy = torch.cat([1 - err[rows] / (x64[rows] - x64[rows].mean(0)).pow(2).sum(1) for rows in batches])
    assert m["raw_fve_per_token"] == pytest.approx(float(legacy.mean()))

    halved = ReconstructionStats(16, torch.device("cpu"))
    halved.add(x, 0.5 * x)
    h = halved.result()
    assert (h["cosine"], h["l2_ratio"], h["relative_reconstruction_bias"]) == pytest.approx((1.0, 0.5, 0.5))
    assert h["fve_vs_zero"] == pytest.approx(0.75)


def test_fve_matches_saelens_explained_variance():
    evals = pytest.importorskip("sae_lens.evals")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=gen) + 3
    x_hat = x + 0.5 * torch.randn(500, 8, generator=gen)
    ours = ReconstructionStats(8, torch.device("cpu"))
    theirs = evals.ExplainedVarianceCalculator()
    for i in range(0, 500, 100):
        ours.add(x[i : i + 100], x_hat[i : i + 100])
        theirs.add_batch(sae_output=x_hat[i : i + 100], hidden_acts=x[i : i + 100])
    assert ours.result()["fve"] == pytest.approx(theirs.compute(), rel=1e-6)


def test_sparsity_stats_over_two_batches_give_the_hand_counted_l0_l1_dead_and_dense_latents():
    """Counts accumulated across batches equal those of the whole: L0 and L1 per token, L0 quantiles and
    histogram, per-latent densities, the dead fraction (never fired) and the dense fraction (density > 0.1)."""
    codes = torch.zeros(10, 6)
    codes[:, 0] = 1.0  # fires everywhere: dense
    codes[:5, 1] = 2.0
    codes[0, 2] = 3.0  # fires once
    # latents 3, 4, 5 never fire: dead
    stats = SparsityStats(6, torch.device("cpu"))
    stats.add(DenseCode(codes[:4]))
    stats.add(DenseCode(codes[4:]))
    m = stats.result()
    assert m["l0"] == pytest.approx((3 + 2 * 4 + 1 * 5) / 10)
    assert m["l1"] == pytest.approx((10 * 1.0 + 5 * 2.0 + 3.0) / 10)  # summed activation per token
    assert m["l0_quantiles"] == {"p10": 1, "p50": 1, "p90": 2, "max": 3}
    assert m["l0_histogram"]["counts"] == [0, 5, 4, 1]
    assert m["dead_fraction"] == pytest.approx(0.5) and m["log10_density_histogram"]["dead"] == 3
    assert m["dense_fraction"] == pytest.approx(2 / 6)  # densities 1.0 and 0.5 exceed 0.1
    assert sum(m["log10_density_histogram"]["counts"]) == 3
    np.testing.assert_allclose(stats.density(), [1.0, 0.5, 0.1, 0, 0, 0])


def test_ablation_sparsity_is_one_over_vt_when_one_logit_moves(monkeypatch):
    """Removing a latent that moves a single logit (at a single later position) scores 1/(V·T); a
    uniform shift of all logits is not an effect (the per-position median is subtracted)."""
    vocab, future = 50, 4

    class OneLatentSAE(torch.nn.Module):
        d_sae = 3

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return DenseCode(torch.tensor([[0.0, 2.0, 1.0]]).expand(len(x), -1))

        def decode(self, code):
            return code.values  # the code itself is the "reconstruction" (d_in = 3)

    def fake_run_to_hooks(model, tokens, hooks):
        return {hooks[0]: torch.ones(tokens.shape[0], tokens.shape[1], 3)}

    # the logits read the activation spliced at p (zeros elsewhere stand in for the clean positions)
    def fake_logits(model, tokens, hook, replace):
        acts = replace(torch.zeros(tokens.shape[0], tokens.shape[1], 3))
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], vocab)
        p = int((acts.abs().sum(-1) > 0).float().argmax(1)[0])  # the spliced position
        logits += acts[:, p, 1:2, None] * 7.0  # latent 1 shifts every logit alike: no effect
        logits[:, -1, 3] += acts[:, p, 2] * 5.0  # latent 2 moves one logit at the last position
        return logits

    import stages.evaluate.ablation as hm  # where ablation sparsity calls the model

    monkeypatch.setattr(hm, "run_to_hooks", fake_run_to_hooks)
    monkeypatch.setattr(hm, "logits_with_hook_replaced", fake_logits)
    tokens = np.arange(20)[None].repeat(2, 0)
    stored = np.zeros_like(tokens, dtype=bool)
    stored[:, 5] = True  # p = 5, so positions 5..8 are scored (T = 4)
    result = ablation.ablation_sparsity(
        OneLatentSAE(), Normalization("none"), None, tokens, stored, HOOK, future_tokens=future, progress=False
    )
    assert result["ablation_count"] == 2  # latent 2 in each context; latent 1 moved nothing once centered
    assert result["ablation_sparsity"] == pytest.approx(1 / (vocab * future))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    store = root / "s.zarr"
    assert run(*COLLECT, "--out", str(store)).exit_code == 0
    out = root / "run"
    result = run(
        "train",
        str(store),
        "--width",
        "64",
        "--k",
        "4",
        "--tokens",
        "30000",
        "--batch-size",
        "512",
        "--out",
        str(out),
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    result = run("eval", str(out), "--ablation-contexts", "3", "--no-progress")
    assert result.exit_code == 0, result.output
    return store, out, json.loads((out / "eval.json").read_text())


def test_eval_writes_every_metric(trained):
    _, out, m = trained
    for prefix in ("", "raw_"):
        for key in (
            "mse",
            "mse_per_token",
            "nmse",
            "fve",
            "fve_per_token",
            "nmse_vs_zero",
            "fve_vs_zero",
            "cosine",
            "l2_ratio",
            "relative_reconstruction_bias",
        ):
            assert np.isfinite(m[prefix + key]), prefix + key
    # the raw-scale fve is the normalized one: center-scale normalization is affine per dimension alike
    assert m["raw_fve"] == pytest.approx(m["fve"], rel=1e-4)
    assert m["raw_mse"] > 0 and m["raw_cosine"] <= 1
    assert m["l0"] <= 4 and m["l0_quantiles"]["max"] <= 4
    assert sum(m["l0_histogram"]["counts"]) == m["eval_rows"]
    density = np.load(out / "feature_density.npy")
    assert density.shape == (64,) and m["dead_fraction"] == pytest.approx(float((density == 0).mean()))
    assert 0 < m["ablation_sparsity"] <= 1 and m["ablation_count"] >= 3
    assert 0 <= m["kl_div_score"] <= 1 and m["kl"] <= m["kl_zero"]


def test_splice_from_scores_only_later_positions(trained):
    _, out, full = trained
    result = run("eval", str(out), "--splice-from", "20", "--ablation-contexts", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    late = json.loads((out / "eval.json").read_text())
    assert late["splice_from"] == 20
    # positions 20..30 predict (31 is the last), against 1..30 before: 11 of 30 per context
    assert late["downstream_tokens"] == pytest.approx(full["downstream_tokens"] * 11 / 30, rel=0.02)
    assert late["ce_clean"] != full["ce_clean"]
    assert run("eval", str(out), "--splice-from", "32", "--no-progress").exit_code == 2


def test_external_saelens_sae_scores_like_our_own(trained, tmp_path):
    """The run's SAELens export (normalization folded into the weights, reading raw activations),
    evaluated as an external SAE on the same store, scores what our own eval reported."""
    pytest.importorskip("sae_lens")
    store, out, ours = trained
    external = tmp_path / "ext"
    result = run(
        "eval",
        str(external),
        "--external",
        str(out / "saelens"),
        "--store",
        str(store),
        "--ablation-contexts",
        "0",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    theirs = json.loads((external / "eval.json").read_text())
    for key in ("fve", "raw_fve", "cosine", "l0", "ce_sae", "ce_recovered", "kl"):
        assert theirs[key] == pytest.approx(ours[key], rel=2e-3, abs=1e-4), key
    assert theirs["sae"]["arch"] == "external"
    # re-evaluating the folder needs no --external: it remembers the SAE and the store; and it reports
    assert run("eval", str(external), "--no-model", "--no-progress").exit_code == 0
    result = run("report", str(out), str(external), "--out", str(tmp_path / "report"), "--no-model", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "ext" in (tmp_path / "report" / "index.html").read_text()

    bad = tmp_path / "bad"
    shutil.copytree(out / "saelens", bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.0.hook_resid_pre"
    (bad / "cfg.json").write_text(json.dumps(cfg))
    result = run_catching("eval", str(tmp_path / "e2"), "--external", str(bad), "--store", str(store))
    assert result.exit_code == 2 and "reads hook 'blocks.0.hook_resid_pre'" in result.output
    result = run_catching("eval", str(tmp_path / "e3"), "--external", str(tmp_path), "--store", str(store))
    assert result.exit_code == 2 and "is not a SAELens SAE folder" in result.output
    result = run_catching("eval", str(tmp_path / "e4"), "--external", str(out / "saelens"))
    assert result.exit_code == 2 and "--external needs --store" in result.output
