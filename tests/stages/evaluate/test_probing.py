"""k-sparse probing (`--suite probing`): the probe's logistic regression against a direct minimization of
the same objective, the latent choice, and the suite through `saepipe eval` on the tiny model."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from stages.evaluate.probing import fit_logistic_regression, top_k_by_mean_difference
from stages.text.probing_tasks import STDLIB_PACKAGE, probing_data
from tests.helpers.cli import expect_error, run, run_ok


def test_the_logistic_regression_minimizes_scikit_learns_objective():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * [1.0, 5.0, 0.2] + [0.0, 2.0, -1.0]
    y = (x @ [1.0, -0.3, 2.0] + rng.normal(size=200) > -2.0).astype(float)
    predict = fit_logistic_regression(torch.from_numpy(x), torch.from_numpy(y).bool())
    z = x  # no standardization, as SAEBench's scikit-learn probe

    def objective(p):  # C = 1: Σ log-loss + ½‖w‖², the bias not penalized
        logits = z @ p[:3] + p[3]
        return np.sum(np.logaddexp(0, logits) - y * logits) + 0.5 * p[:3] @ p[:3]

    best = minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    expected = (z @ best[:3] + best[3]) > 0
    assert np.array_equal(predict(torch.from_numpy(x)).numpy(), expected)
    assert (
        0.8 < expected.mean() + (1 - expected.mean()) * 0 + np.mean(expected == y.astype(bool)) - expected.mean() + 0.2
    )


def test_top_k_by_mean_difference_finds_the_features_that_separate():
    features = torch.rand(100, 50)
    positive = torch.arange(100) < 40
    features[positive, 7] += 3.0
    features[positive, 31] -= 2.0  # lower on the class: chosen by its absolute difference
    assert set(top_k_by_mean_difference(features, positive, 2).tolist()) == {7, 31}


def test_the_default_task_is_standard_library_docstrings_by_package():
    data = probing_data(STDLIB_PACKAGE)
    counts = {label: data.labels.count(label) for label in set(data.labels)}
    assert len(counts) == 6 and min(counts.values()) >= 120 and "email" in counts
    assert all(len(text) >= 80 for text in data.texts)


@pytest.fixture(scope="module")
def tiny_run(tiny_store, tmp_path_factory):
    run_folder = tmp_path_factory.mktemp("probe") / "run"
    run_ok("train", tiny_store, "--width", 64, "--k", 4, "--tokens", 4096, "--batch-size", 512, "--no-progress",
           "--out", run_folder)  # fmt: skip
    return run_folder


def test_eval_probes_a_labelled_file(tiny_run, tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(90):  # three classes told apart by their words
        label = ["vowels", "digits", "signs"][i % 3]
        alphabet = {"vowels": "aeiou", "digits": "0123456789", "signs": "+-*/=<>"}[label]
        text = " ".join("".join(rng.choice(list(alphabet), size=3)) for _ in range(8))
        rows.append({"body": text, "kind": label})
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = run_ok("eval", tiny_run, "--tokens", 256, "--ablation-contexts", 0, "--no-progress", "--suite", "probing",
                   "--probe-data", data, "--probe-text-column", "body", "--probe-label-column", "kind").output  # fmt: skip
    probing = json.loads((tiny_run / "eval.json").read_text())["probing"]
    assert (
        probing["classes"] == 3
        and probing["texts"] == 90
        and set(probing["per_class"]) == {"vowels", "digits", "signs"}
    )
    assert probing["model_top_5_accuracy"] >= 0.9  # the words alone give the class away
    for key in ("sae_top_1", "sae_top_2", "sae_top_5", "model_top_1", "model_top_2", "model_top_5"):
        assert 0 <= probing[f"{key}_accuracy"] <= 1
    assert "probing sae_top_5" in table
    run_ok("report", tiny_run, "--no-model", "--no-progress", "--out", tmp_path / "report")
    assert (tmp_path / "report" / "frontier_l0_probing_sae_top_1_accuracy.png").stat().st_size > 5_000
    page = (tmp_path / "report" / "index.html").read_text()
    assert "k-sparse probing" in page and "probing.model_top_5_accuracy" in page


def test_bad_probing_input_is_refused_in_one_line(tiny_run, tmp_path):
    run_ok("eval", tiny_run, "--no-model", "--no-progress")
    before = (tiny_run / "eval.json").read_bytes()
    data = tmp_path / "one-class.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": "same"}) + "\n" for i in range(30)))
    expect_error(run("eval", tiny_run, "--suite", "probing", "--probe-data", data), "has 1 class(es) with at least 12")
    expect_error(
        run("eval", tiny_run, "--suite", "probing", "--probe-data", data, "--probe-label-column", "kind"),
        "has no column 'kind' (columns: text, label): pass --probe-label-column",
    )
    expect_error(run("eval", tiny_run, "--suite", "probing", "--no-model"), "--suite probing runs the model")
    assert (tiny_run / "eval.json").read_bytes() == before  # refused before anything was written
