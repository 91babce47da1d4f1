"""Experiment tracking (`saepipe train --wandb PROJECT`), run through the CLI with wandb offline: the
files wandb writes under the run folder hold every training-log line once, the run's config, then the
eval keys and the report's plots; a resumed run continues its wandb run; a missing wandb is one line."""

import json
import sys

import pytest

from stages.basics import run_dir
from tests.helpers.cli import expect_error, run, run_ok
from tests.helpers.wandb_files import offline_runs

TRAIN = ["--width", 64, "--k", 4, "--batch-size", 256, "--log-every", 4, "--checkpoint-every", 8, "--no-progress"]
TIMING = ("it_per_s", "tokens_per_s")  # a step redone after a resume runs at another speed


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch, tmp_path):
    """wandb records locally, says nothing, and keeps its settings and caches in the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def _logged(session) -> list[dict]:
    """The rows a session logged, without wandb's own keys (_step, _runtime, _timestamp)."""
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in session.history]


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_train_eval_and_report_log_into_one_wandb_run(tiny_store, tmp_path):
    out = tmp_path / "run"
    run_ok(
        "train", tiny_store, *TRAIN, "--tokens", 4096, "--wandb", "saepipe-test", "--wandb-run", "first", "--out", out
    )

    identity = json.loads((out / run_dir.WANDB).read_text())
    (train,) = offline_runs(out / run_dir.WANDB_FILES)
    assert (train.project, train.name, train.run_id) == ("saepipe-test", "first", identity["id"])
    assert identity["name"] == "first" and identity["last_step"] == 16
    log = run_dir.read_log(out)
    assert [row["step"] for row in log] == [4, 8, 12, 16]
    assert _logged(train) == log  # every key of every line, each step once
    assert [row["_step"] for row in train.history] == [4, 8, 12, 16]  # wandb's step is the training step
    assert {k: v for k, v in train.config.items() if k != "_wandb"} == run_dir.load_config(out)
    assert train.exit_code == 0

    run_ok("eval", out, "--no-model", "--no-progress")
    evaluated = json.loads((out / run_dir.EVAL).read_text())
    sessions = offline_runs(out / run_dir.WANDB_FILES)
    assert len(sessions) == 2 and sessions[1].run_id == identity["id"]
    (row,) = _logged(sessions[1])
    for key in ("fve", "mse", "l0", "dead_fraction", "eval_rows"):
        assert row[f"eval/{key}"] == sessions[1].summary[f"eval/{key}"] == evaluated[key], key
    assert row["eval/l0_quantiles/p50"] == evaluated["l0_quantiles"]["p50"]
    assert not any(key.startswith("eval/sae/") for key in row)  # the SAE's settings are in the config

    run_ok("report", out, "--no-model", "--no-progress", "--out", tmp_path / "report")
    report = offline_runs(out / run_dir.WANDB_FILES)[2]
    assert report.run_id == identity["id"]
    (row,) = report.history
    plots = {key.split("/")[1] for key in row if key.startswith("report/")}
    assert plots == {"training_curves", "frontier_l0_fve", "density"}
    assert len(report.media) == 3
    pngs = {(tmp_path / "report" / name).read_bytes() for name in ("training_curves.png", "frontier_l0_fve.png")}
    assert pngs <= {png.read_bytes() for png in report.media}


def test_a_resumed_run_continues_its_wandb_run_and_logs_every_step_once(tiny_store, tmp_path, crash_training):
    out = tmp_path / "run"
    args = ["train", tiny_store, *TRAIN, "--tokens", 32 * 256, "--out", out]

    crash_training.arm(10)  # untracked, dies after step 10: the checkpoint at 8 survives
    with pytest.raises(crash_training.Crash):
        run(*args)
    crash_training.arm(14)  # tracked from the resume on (the kept lines 4 and 8 are sent first); dies after 22
    with pytest.raises(crash_training.Crash):
        run(*args, "--resume", "--wandb", "saepipe-test")
    crash_training.disarm()
    first_id = json.loads((out / run_dir.WANDB).read_text())["id"]
    run_ok(*args, "--resume", "--wandb", "saepipe-test")  # from the checkpoint at 16: step 20 is redone

    sessions = offline_runs(out / run_dir.WANDB_FILES)
    assert [s.run_id for s in sessions] == [first_id, first_id]
    assert [s.exit_code for s in sessions] == [1, 0]  # the crashed session closed as failed
    assert [row["step"] for row in _logged(sessions[0])] == [4, 8, 12, 16, 20]
    assert [row["step"] for row in _logged(sessions[1])] == [24, 28, 32]
    log = run_dir.read_log(out)
    logged = _logged(sessions[0]) + _logged(sessions[1])
    assert _without_timing(logged) == _without_timing(log)  # every step once, as the training log has it
    assert logged[-3:] == log[-3:]


def test_a_sweep_tracks_one_wandb_run_per_sae(tiny_store, tmp_path):
    out = tmp_path / "sweep"
    run_ok("train", tiny_store, *TRAIN, "--tokens", 2048, "--sweep", "k=2,4", "--wandb", "saepipe-test",
           "--wandb-run", "exp", "--out", out)  # fmt: skip
    names, ids = [], set()
    for member in ("k=2", "k=4"):
        (session,) = offline_runs(out / member / run_dir.WANDB_FILES)
        names.append(session.name)
        ids.add(session.run_id)
        assert _logged(session) == run_dir.read_log(out / member)
        assert session.config["training"]["k"] == int(member[2:])
    assert names == ["exp-k=2", "exp-k=4"] and len(ids) == 2


def test_a_missing_wandb_is_one_line_at_train_and_a_warning_after(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_ok("train", tiny_store, *TRAIN, "--tokens", 2048, "--out", out)
    run_dir.write_json_atomic(out / run_dir.WANDB, {"project": "saepipe-test", "id": "abc123", "last_step": 8})
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails

    result = run("train", tiny_store, *TRAIN, "--tokens", 2048, "--wandb", "p", "--out", tmp_path / "other")
    expect_error(result, "--wandb needs the wandb package, which is not installed: pip install 'saepipe[wandb]'")
    assert not (tmp_path / "other").exists()  # refused before the run folder is made

    result = run_ok("eval", out, "--no-model", "--no-progress")
    assert "wandb is not installed: its eval is not logged there (pip install 'saepipe[wandb]')" in result.output
    assert (out / run_dir.EVAL).is_file()
