"""`--suite ground-truth`: MCC and recovered fraction of an SAE against the features a synthetic store was
built from; the MCC against SAELens's own (sae_lens.synthetic.evals)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from stages.evaluate.ground_truth import mean_correlation_coefficient, recovered_fraction
from tests.helpers.cli import expect_error, run, run_ok
from tests.helpers.planted import PlantedFeatures, planted_store


def test_mcc_is_one_for_the_planted_directions_in_any_order_scale_and_sign():
    planted = torch.randn(40, 16)
    learned = torch.cat([3 * planted[torch.randperm(40)], torch.randn(20, 16)])  # plus 20 other latents
    assert mean_correlation_coefficient(learned, planted) == pytest.approx(1.0)
    assert recovered_fraction(learned, planted) == 1.0
    # MCC takes |cosine| (as SAELens's); recovery needs the direction itself: codes are non-negative
    assert mean_correlation_coefficient(-learned, planted) == pytest.approx(1.0)
    assert recovered_fraction(-learned, planted) == 0.0


def test_mcc_agrees_with_saelens():
    evals = pytest.importorskip("sae_lens.synthetic.evals")
    torch.manual_seed(0)
    learned, planted = torch.randn(300, 32), torch.randn(200, 32)
    learned[:100] = planted[:100] + 0.3 * torch.randn(100, 32)
    ours = mean_correlation_coefficient(learned, planted)
    assert ours == pytest.approx(evals.mean_correlation_coefficient(learned, planted), abs=1e-6)


def test_eval_reports_them_for_a_synthetic_store(tmp_path):
    features, store = planted_store(tmp_path / "s.zarr", 60_000, 2048)
    save_file({"features": torch.from_numpy(features.directions)}, tmp_path / "truth.safetensors")
    run_folder = tmp_path / "run"
    run_ok("train", store, "--width", 512, "--k", 8, "--tokens", 480_000, "--batch-size", 1024, "--lr", 4e-3,
           "--no-progress", "--out", run_folder)  # fmt: skip
    table = run_ok("eval", run_folder, "--no-model", "--no-progress", "--suite", "ground-truth",
                   "--truth", tmp_path / "truth.safetensors").output  # fmt: skip
    truth = json.loads((run_folder / "eval.json").read_text())["ground_truth"]
    from stages.saes.saved import load_sae

    sae, _ = load_sae(run_folder)
    assert truth["features"] == 256
    assert truth["recovered_fraction"] == pytest.approx(
        PlantedFeatures.recovered_fraction(features, sae.W_dec.detach())
    )
    assert truth["recovered_fraction"] >= 0.9 and truth["mcc"] > 0.9
    assert "ground truth mcc" in table


def test_bad_truth_is_refused_in_one_line(tiny_store, tmp_path):
    run_folder = tmp_path / "run"
    run_ok("train", tiny_store, "--width", 64, "--k", 4, "--tokens", 2048, "--batch-size", 512, "--no-progress",
           "--out", run_folder)  # fmt: skip
    expect_error(run("eval", run_folder, "--no-model", "--suite", "ground-truth"), "pass --truth FILE")
    save_file({"features": torch.randn(10, 7)}, tmp_path / "narrow.safetensors")
    expect_error(
        run("eval", run_folder, "--no-model", "--suite", "ground-truth", "--truth", tmp_path / "narrow.safetensors"),
        "holds features of shape (10, 7); the SAE writes rows of width 64",
    )
    save_file({"other": torch.randn(10, 64)}, tmp_path / "unnamed.safetensors")
    expect_error(
        run("eval", run_folder, "--no-model", "--suite", "ground-truth", "--truth", tmp_path / "unnamed.safetensors"),
        "holds no tensor 'features'",
    )
    assert not (run_folder / "eval.json").exists()
