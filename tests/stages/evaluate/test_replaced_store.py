"""A run knows its store: eval and report of a run whose store was collected again (or replaced) at the
same path refuse with one line naming both fingerprints, before any work; naming the new store with
--store evaluates on it deliberately."""

import json
import shutil

from stages.basics import run_dir
from tests.helpers.cli import collect_args, run_catching, run_ok

TRAIN = ("--width", "32", "--k", "4", "--tokens", "4096", "--batch-size", "256", "--no-progress")


def test_a_replaced_store_is_refused_by_eval_and_report(tiny_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    out = tmp_path / "run"
    run_ok("train", store, *TRAIN, "--out", out)
    run_ok("eval", out, "--no-model", "--no-progress")
    good = (out / run_dir.EVAL).read_bytes()
    recorded = json.loads((out / run_dir.CONFIG).read_text())["store"]["fingerprint"]

    shutil.rmtree(store)  # the same command with another seed: other held-out contexts, other rows
    run_ok(*collect_args(4000), "--seed", "7", "--out", store)
    for command in (("eval", out, "--no-model", "--no-progress"), ("report", out, "--no-model", "--no-progress")):
        result = run_catching(*command, *(("--out", tmp_path / "report") if command[0] == "report" else ()))
        assert result.exit_code == 2, result.output
        line = result.output.strip().splitlines()[-1]
        assert f"{store} is not the store {out} recorded" in line and f"recorded {recorded}" in line, line
        assert f"saepipe eval {out} --store {store}" in line
    assert (out / run_dir.EVAL).read_bytes() == good and not (tmp_path / "report").exists()

    run_ok("eval", out, "--store", store, "--no-model", "--no-progress")  # on purpose: evaluated, and recorded
    assert json.loads((out / run_dir.EVAL).read_text())["store_fingerprint"] != recorded
    run_ok("report", out, "--no-model", "--no-progress", "--out", tmp_path / "report")  # of the store eval used


def test_the_store_grown_by_append_is_still_the_runs_store(tiny_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    out = tmp_path / "run"
    run_ok("train", store, *TRAIN, "--out", out)
    run_ok("collect", "--append", store, "--tokens", 6000, "--no-progress")
    run_ok("eval", out, "--no-model", "--no-progress")  # every row and held-out context it had, and more


def test_eval_holds_the_run_folder_as_training_does(tiny_store, tmp_path, monkeypatch):
    import errno
    import os

    from store_schema.lock import StoreLock

    out = tmp_path / "run"
    run_ok("train", tiny_store, *TRAIN, "--out", out)
    with StoreLock(out, kind="run folder"):  # a live training (or eval) of the folder, this process
        result = run_catching("eval", out, "--no-model", "--no-progress")
        assert result.exit_code == 2 and f"run folder {out} is being written by pid {os.getpid()}" in result.output
        trained = run_catching("train", tiny_store, *TRAIN, "--out", out, "--overwrite")
        assert trained.exit_code == 2 and "is being written by pid" in trained.output
    assert not (out / run_dir.EVAL).exists()

    real_open = os.open

    def read_only(path, *args, **kwargs):  # a run folder on read-only media (root ignores chmod)
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    result = run_catching("eval", out, "--no-model", "--no-progress")
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert f"cannot write beside run folder {out} (Read-only file system" in line and "read-only place" in line
