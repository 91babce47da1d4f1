"""Bugs found by trying saepipe as a new user would: each is now refused or handled in one
line, and the tests below fail if one comes back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stages.basics import run_dir
from tests.helpers.cli import collect_args, expect_error, run, run_ok
from tests.helpers.files import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
# A run long enough to stop part-way: about 4,000 steps of a tiny SAE, logging every 20.
TRAIN = [
    "--width",
    "32",
    "--k",
    "4",
    "--tokens",
    "2000000",
    "--batch-size",
    "512",
    "--log-every",
    "20",
    "--no-progress",
]


def _saepipe(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def _ctrl_c_reaches_it() -> None:
    """Ctrl-C's default in the child, whatever the suite inherited: a shell without job control starts
    its background commands with SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_ctrl_c_reaches_it)


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _logged(out: Path) -> int:
    return len(run_dir.read_log(out)) if (out / run_dir.TRAIN_LOG).exists() else 0


def test_a_context_longer_than_the_model_takes_is_refused_before_any_store(tmp_path):
    out = tmp_path / "s.zarr"
    args = [a if a != "32" else "100000" for a in collect_args(2000)]  # --context-size 100000
    expect_error(run(*args, "--out", out), "--context-size 100,000 is more than tiny-random takes", "at most 256")
    assert list(tmp_path.iterdir()) == []  # no store to resume, no lock left


def test_ctrl_c_and_sigterm_say_what_was_kept(tiny_store, tmp_path):
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = tmp_path / f"run-{code}"
        command = _saepipe("train", tiny_store, *TRAIN, "--checkpoint-every", "50", "--out", out)
        proc = _start(command)
        _wait_for(lambda out=out: (out / run_dir.CHECKPOINT).exists())
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == code, stderr
        assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
        assert (
            stderr.strip()
            .splitlines()[-1]
            .endswith("the run keeps its last checkpoint; run the same command with --resume to continue it")
        )
        assert run_dir.read_log(out)  # what was logged is kept


def test_resume_without_a_checkpoint_starts_over_with_a_clean_log(tiny_store, tmp_path):
    out = tmp_path / "run"
    args = ["train", tiny_store, "--width", "32", "--k", "4", "--tokens", "40960", "--batch-size", "512"]
    command = _saepipe(*args, "--log-every", "5", "--checkpoint-every", "1000", "--no-progress", "--out", out)
    proc = _start(command)
    _wait_for(lambda: _logged(out) >= 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert not (out / run_dir.CHECKPOINT).exists() and _logged(out) >= 1
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "has no checkpoint (its run stopped before the first): training starts from the beginning" in resumed.stderr
    steps = [row["step"] for row in run_dir.read_log(out)]
    assert steps == list(range(5, 81, 5))  # every step once


def test_a_store_is_never_copied_into_itself(tiny_store, tmp_path):
    store = tmp_path / "s.zarr"
    run_ok("store", "copy", tiny_store, store, "--no-progress")
    expect_error(
        run("store", "copy", store, store / "inner.zarr", "--no-progress"), "the destination is inside the store"
    )
    expect_error(run("store", "copy", store, tmp_path / ".." / tmp_path.name / "s.zarr"), "they are the same place")
    expect_error(run("store", "copy", store, tmp_path, "--no-progress"), "the store is inside the destination")
    assert not (store / "inner.zarr").exists()
    assert run("store", "verify", store, "--no-progress").output.startswith("ok: ")
    (store / "inner.zarr").mkdir()  # what a copy into itself used to leave
    (store / "inner.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    verified = run("store", "verify", store, "--no-progress", catch_exceptions=True)
    assert verified.exit_code == 2 and "inner.zarr/zarr.json is not part of the store" in verified.output


def test_two_trainings_of_one_run_folder_are_kept_apart(tiny_store, tmp_path):
    out = tmp_path / "run"
    command = _saepipe("train", tiny_store, *TRAIN, "--out", out)
    first = _start(command)
    _wait_for(lambda: _logged(out) >= 1)
    second = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert second.returncode == 2, second.stderr
    assert (
        second.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: run folder {out} is being written by pid {first.pid}")
    )
    first.send_signal(signal.SIGKILL)  # a killed run leaves its lock: the next one takes it over
    first.communicate()
    short = [a if a != "2000000" else "20480" for a in command]
    taken = subprocess.run(short + ["--overwrite"], capture_output=True, text=True, env=ENV)
    assert taken.returncode == 0 and "taking over the stale lock" in taken.stderr, taken.stderr


def test_ctrl_c_during_collect_says_the_store_resumes(tmp_path):
    from store_schema.reader import open_store

    out = tmp_path / "s.zarr"
    command = _saepipe(*collect_args(60000), "--out", out)

    def committed() -> bool:
        try:
            return open_store(out).n_rows("train") > 0
        except Exception:  # noqa: BLE001 - not created yet
            return False

    proc = _start(command)
    _wait_for(lambda: committed() or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: the store keeps every committed block; run the same command again to resume it"
    )
    resumed = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
