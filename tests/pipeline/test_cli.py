"""The `saepipe` command line end to end on the tiny random model, and its one-line errors."""

import json

import numpy as np
import pytest

from store_schema.generated import write_array_store
from store_schema.writer import StoreWriter
from tests.helpers.cli import HOOK, collect_args, expect_error, run, run_ok

COLLECT = collect_args(8000)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.zarr"
    run_ok(*COLLECT, "--out", str(path))
    return path


def test_collect_train_eval_info(store, tmp_path):
    out = tmp_path / "run"
    result = run(
        "train",
        str(store),
        "--width",
        "128",
        "--k",
        "4",
        "--tokens",
        "40000",
        "--batch-size",
        "512",
        "--out",
        str(out),
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    for name in (
        "sae.safetensors",
        "cfg.json",
        "train_log.jsonl",
        "saelens/cfg.json",
        "saelens/sae_weights.safetensors",
    ):
        assert (out / name).exists(), name
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["hook"] == HOOK and cfg["normalization"]["mode"] == "center-scale"
    assert cfg["store"]["fingerprint"] and cfg["training"]["width"] == 128
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "loss", "mse", "fve", "l0", "dead_fraction", "it_per_s", "tokens_per_s"} <= set(log[-1])

    result = run("eval", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "eval.json").read_text())
    keys = {
        "mse",
        "nmse",
        "fve",
        "cosine",
        "l0",
        "dead_fraction",
        "dense_fraction",
        "ce_clean",
        "ce_sae",
        "ce_zero",
        "ce_recovered",
        "kl",
        "delta_loss",
    }
    assert keys <= set(metrics)
    assert all(np.isfinite(metrics[k]) for k in keys)
    assert metrics["l0"] <= 4 and 0 < metrics["fve"] <= 1 and metrics["kl"] >= 0
    assert metrics["ce_zero"] > metrics["ce_clean"]
    assert "ce_recovered" in result.output

    result = run("eval", str(out), "--no-model", "--no-progress")
    assert result.exit_code == 0 and "ce_clean" not in json.loads((out / "eval.json").read_text())

    for path in (store, out):
        result = run("info", str(path))
        assert result.exit_code == 0, result.output
        assert ("fingerprint" if path == store else "finished") in result.output


def test_train_again_needs_overwrite_or_resume(store, tmp_path):
    args = [
        "train",
        str(store),
        "--width",
        "64",
        "--k",
        "4",
        "--tokens",
        "2048",
        "--batch-size",
        "512",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    assert run(*args).exit_code == 0
    again = run(*args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert run(*args, "--overwrite").exit_code == 0


def test_unknown_hook_lists_close_matches(tmp_path):
    expect_error(
        run(*COLLECT[:3], "--hook", "blocks.2.hook_resid_pots", "--out", str(tmp_path / "s.zarr")),
        "unknown hook 'blocks.2.hook_resid_pots'",
        "blocks.2.hook_resid_post",
    )
    assert not (tmp_path / "s.zarr").exists()


def test_missing_dataset_and_column(tmp_path):
    expect_error(
        run(*COLLECT, "--dataset", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s.zarr")), "nope.jsonl"
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello world"}\n')
    expect_error(run(*COLLECT, "--dataset", str(data), "--out", str(tmp_path / "s.zarr")), "text", "body")
    assert not (tmp_path / "s.zarr").exists()


def test_unknown_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_error(
        run(*COLLECT[:1], "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "s.zarr")),
        "no-such-org/no-such-model",
    )


def test_store_problems_are_named(store, tmp_path):
    expect_error(run("train", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "r")), "no store at")
    expect_error(
        run("train", str(store), "--hook", "blocks.0.hook_resid_post", "--out", str(tmp_path / "r")),
        "hook 'blocks.0.hook_resid_post' is not in store",
    )
    expect_error(run("train", str(store), "--k", "0", "--out", str(tmp_path / "r")), "--k must be in")
    expect_error(run("train", str(store), "--arch", "vq", "--out", str(tmp_path / "r")), "unknown --arch 'vq'")
    expect_error(
        run("train", str(store), "--max-grad-norm", "-1", "--out", str(tmp_path / "r")), "--max-grad-norm must be >= 0"
    )

    rng = np.random.default_rng(0)
    partial = tmp_path / "partial.zarr"
    write_array_store(partial, rng.standard_normal((4096, 64)), rng.standard_normal((64, 64)), hook=HOOK)
    writer = StoreWriter.open(partial)
    writer._update(complete=False)
    expect_error(run("train", str(partial), "--out", str(tmp_path / "r2")), "incomplete", "re-running the same")


def test_eval_refuses_a_store_of_another_width(store, tmp_path):
    out = tmp_path / "run"
    assert (
        run(
            "train",
            str(store),
            "--width",
            "64",
            "--k",
            "4",
            "--tokens",
            "2048",
            "--batch-size",
            "512",
            "--out",
            str(out),
            "--no-progress",
        ).exit_code
        == 0
    )
    rng = np.random.default_rng(0)
    other = tmp_path / "other.zarr"
    write_array_store(other, rng.standard_normal((600, 32)), rng.standard_normal((60, 32)), hook=HOOK)
    expect_error(
        run("eval", str(out), "--store", str(other), "--no-model"), "has d_in 64 but store", "has rows of width 32"
    )
    expect_error(run("eval", str(tmp_path / "nothing")), "not a finished saepipe run")


def test_flags_of_another_architecture_are_refused(store, tmp_path):
    expect_error(
        run("train", str(store), "--l1-coef", "5", "--out", str(tmp_path / "r")),
        "--l1-coef does not apply to --arch topk",
        "relu",
    )
    expect_error(run("train", str(store), "--groups", "16,x", "--out", str(tmp_path / "r")), "--groups must be")


def test_sweep_trains_every_combination_from_one_read(store, tmp_path, monkeypatch):
    from store_schema import loader

    reads = []
    real_batches = loader.ShuffledBatches.batches
    monkeypatch.setattr(
        loader.ShuffledBatches, "batches", lambda self, start=0: reads.append(start) or real_batches(self, start)
    )
    out = tmp_path / "sweep"
    result = run(
        "train",
        str(store),
        "--width",
        "64",
        "--tokens",
        "4096",
        "--batch-size",
        "512",
        "--out",
        str(out),
        "--sweep",
        "k=2,4",
        "--sweep",
        "lr=1e-3,3e-3",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert reads == [0]  # one loader for all four SAEs
    summary = json.loads((out / "sweep.json").read_text())
    assert sorted(r["run"] for r in summary["runs"]) == ["k=2_lr=0.001", "k=2_lr=0.003", "k=4_lr=0.001", "k=4_lr=0.003"]
    for r in summary["runs"]:
        cfg = json.loads((out / r["run"] / "cfg.json").read_text())
        assert cfg["sae"]["k"] == r["params"]["k"] and cfg["training"]["lr"] == r["params"]["lr"]
        assert r["final"]["l0"] <= r["params"]["k"] and (out / r["run"] / "saelens" / "cfg.json").exists()
    # a sweep's SAE equals the same SAE trained alone (same batches, same init)
    alone = tmp_path / "alone"
    assert (
        run(
            "train",
            str(store),
            "--width",
            "64",
            "--tokens",
            "4096",
            "--batch-size",
            "512",
            "--k",
            "4",
            "--lr",
            "3e-3",
            "--out",
            str(alone),
            "--no-progress",
        ).exit_code
        == 0
    )
    from safetensors.torch import load_file

    a, b = load_file(str(alone / "sae.safetensors")), load_file(str(out / "k=4_lr=0.003" / "sae.safetensors"))
    for key in a:
        assert (a[key] == b[key]).all(), key


def test_bad_sweeps_are_named(store, tmp_path):
    expect_error(run("train", str(store), "--out", str(tmp_path / "s"), "--sweep", "batch_size=256,512"), "cannot vary")
    expect_error(
        run("train", str(store), "--out", str(tmp_path / "s"), "--sweep", "colour=red"),
        "not a training parameter",
        "sweepable:",
    )
    expect_error(run("train", str(store), "--out", str(tmp_path / "s"), "--sweep", "k=two"), "cannot read 'two'")


def test_saepipe_lists_only_the_users_commands():
    """The measurement harnesses are `python -m benchmarks`, outside the installed package."""
    from pipeline.cli import main

    user = {"collect", "train", "eval", "eval-set", "report", "compare", "export", "info", "store", "prepare-model"}
    assert set(main.commands) == user
    shown = run_ok("--help").output
    assert all(f"  {name} " in shown for name in user) and "bench" not in shown and "gpu-check" not in shown


def test_the_installed_package_leaves_the_benchmarks_out():
    import tomllib
    from setuptools import find_packages

    from tests.helpers.files import REPO

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = find_packages(where=REPO, include=include)
    assert {"pipeline", "stages", "store_schema"} <= set(shipped)
    assert not [p for p in shipped if p.split(".")[0] in ("benchmarks", "tests")]


def test_store_info_is_info_itself(store):
    assert run_ok("store", "info", str(store)).output == run_ok("info", str(store)).output
    assert run_ok("store", "info", str(store), "--json").output == run_ok("info", str(store), "--json").output
