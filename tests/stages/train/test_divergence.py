"""A run that goes non-finite stops at once with one line naming the step, marks nothing finished and keeps
its last good checkpoint; a run says it finished only once every file it promises is written."""

import json
import shutil

import numpy as np
import torch

from stages.basics import run_dir
from stages.train import loop
from stages.train.checkpoint import Checkpoint
from tests.helpers.cli import HOOK, run_catching
from tests.helpers.files import poison_chunk

TRAIN = ("--width", "32", "--k", "4", "--tokens", "20000", "--batch-size", "256", "--no-progress")


def test_non_finite_rows_stop_training_at_the_step_and_keep_the_last_checkpoint(tiny_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    poison_chunk(store / "train" / "acts" / HOOK / "c" / "5" / "0", 4096, np.inf)
    out = tmp_path / "run"
    result = run_catching("train", store, *TRAIN, "--checkpoint-every", "4", "--log-every", "3", "--out", out)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "the loss was not finite (NaN or inf) at step" in line and f"saepipe store verify {store}" in line
    step = int(line.split("at step ")[1].split(";")[0])
    assert 0 <= step < 78  # 20,000 tokens in batches of 256
    config = json.loads((out / run_dir.CONFIG).read_text())
    assert config["finished"] is False and not (out / run_dir.SAE_WEIGHTS).exists()
    assert not (out / run_dir.SAELENS).exists()
    logged = [json.loads(line) for line in (out / run_dir.TRAIN_LOG).read_text().splitlines()]
    assert all(np.isfinite(row["loss"]) for row in logged)  # no line of the diverged window
    if step >= 4:  # a checkpoint taken before the bad step is kept, and its weights are finite
        saved = Checkpoint.load(out / run_dir.CHECKPOINT)
        assert saved.step <= step
        assert all(torch.isfinite(v).all() for v in saved.sae.values())


def test_a_run_is_marked_finished_only_after_its_export(tiny_store, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "export_saelens", no_space)
    out = tmp_path / "run"
    full = run_catching("train", tiny_store, *TRAIN, "--out", out)
    assert full.exit_code == 2 and "no space left on device" in full.output.strip().splitlines()[-1], full.output
    assert json.loads((out / run_dir.CONFIG).read_text())["finished"] is False
    monkeypatch.undo()
    result = run_catching("train", tiny_store, *TRAIN, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / run_dir.CONFIG).read_text())["finished"] is True
    assert (out / run_dir.SAELENS / "cfg.json").exists()


def test_eval_never_writes_non_finite_metrics_over_a_good_eval_json(tiny_store, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert run_catching("train", tiny_store, *TRAIN, "--out", out).exit_code == 0
    assert run_catching("eval", out, "--no-model", "--no-progress").exit_code == 0
    good = (out / run_dir.EVAL).read_bytes()

    poisoned = tmp_path / "poisoned.zarr"
    shutil.copytree(tiny_store, poisoned)
    poison_chunk(poisoned / "eval" / "acts" / HOOK / "c" / "0" / "0", 64, np.nan)
    result = run_catching("eval", out, "--store", poisoned, "--no-model", "--no-progress")
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "gives non-finite" in line and f"saepipe store verify {poisoned}" in line and "nothing was written" in line
    assert (out / run_dir.EVAL).read_bytes() == good

    weights = load_file(out / run_dir.SAE_WEIGHTS)
    weights["W_dec"][0, 0] = float("nan")
    save_file(weights, out / run_dir.SAE_WEIGHTS)
    result = run_catching("eval", out, "--no-model", "--no-progress")
    assert result.exit_code == 2 and "holds non-finite weights (W_dec)" in result.output, result.output
    assert (out / run_dir.EVAL).read_bytes() == good


def test_a_full_disk_while_saving_tensors_is_the_clis_one_line(tiny_store, tmp_path, monkeypatch):
    """safetensors raises its own error type for I/O failures: a full disk during a checkpoint write was a
    traceback. It is now the OSError it is, and the CLI's one line; the partial file is gone."""
    from stages.basics import run_dir as run_dir_module

    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(run_dir_module, "save_file", full)
    out = tmp_path / "run"
    result = run_catching("train", tiny_store, *TRAIN, "--checkpoint-every", "8", "--out", out)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: no space left on device writing") and "checkpoint.safetensors.tmp" in line
    assert "Traceback" not in result.output and not list(out.glob("*.tmp"))


def test_a_diverging_run_of_a_sweep_stops_alone(tiny_store, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_catching("train", tiny_store, *TRAIN, "--sweep", "lr=1e-3,1e30", "--out", sweep)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "1 of the sweep's 2 runs stopped, the others finished" in lines[-1], lines[-1]
    assert any("the sweep's other runs go on" in line for line in lines[:-1])
    finished = {path.name: json.loads((path / run_dir.CONFIG).read_text())["finished"] for path in sweep.iterdir()
                if (path / run_dir.CONFIG).exists()}  # fmt: skip
    assert finished == {"lr=0.001": True, "lr=1e+30": False}, finished
    assert (sweep / "lr=0.001" / run_dir.SAELENS).exists() and not (sweep / "lr=1e+30" / run_dir.SAE_WEIGHTS).exists()
