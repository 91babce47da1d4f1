"""Fault injection: collect and train killed with SIGKILL at seeded random points and resumed, a disk that
fills up during collect, damaged metadata. Nothing may be lost, and nothing may be silently wrong: a
resumed store is bit-identical to an uninterrupted one, resumed weights equal uninterrupted ones."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stages.basics import run_dir
from store_schema.generated import write_array_store
from store_schema.reader import open_store
from tests.helpers.collect import cli_args
from tests.helpers.files import REPO, tree_bytes

HOOK = "blocks.1.hook_resid_post"
COLLECT = [sys.executable, "-m", "pipeline.cli", "collect", *cli_args(HOOK, tokens=24000)]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def committed_rows(store: Path) -> int:
    """Training rows the store's root metadata has committed (0 before it exists or mid-rename)."""
    try:
        meta = json.loads((store / "zarr.json").read_text())
        progress = meta["attributes"]["saepipe"]["progress"]
        return progress["train"]["rows_committed"] + progress["eval"]["rows_committed"]
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def kill_when(proc: subprocess.Popen, ready, extra_delay: float, timeout: float = 120) -> bool:
    """SIGKILL `proc` `extra_delay` seconds after `ready()` first holds; False if it ended by itself first."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the process made no progress in time")
        time.sleep(0.005)
    time.sleep(extra_delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@pytest.fixture(scope="module")
def whole_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "s.zarr"
    subprocess.run(COLLECT + ["--out", str(out)], check=True, capture_output=True, env=ENV)
    return out


def test_collect_killed_at_20_seeded_points_resumes_bit_identical(whole_store, tmp_path):
    """Kill points: seeded targets spread over the run's rows (so every kill lands mid-run, each at a
    later commit), each followed by a seeded extra delay of up to 60 ms so kills also land inside
    writing a block, not only right after a commit. The first kills come before the store exists."""
    total = sum(open_store(whole_store).n_rows(s) for s in ("train", "eval"))
    rng = np.random.default_rng(20)
    targets = np.sort(rng.uniform(0, 0.95 * total, 20))
    targets[:2] = -1  # before any row: kill during start-up or store creation
    out = tmp_path / "s.zarr"
    landed, mid_write = 0, 0
    for target, delay in zip(targets, rng.uniform(0, 0.06, len(targets))):
        proc = subprocess.Popen(
            COLLECT + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
        )
        if target < 0:
            delay = 1.0 + delay * 20  # inside start-up (imports, model, packing) or the store's creation

        def ready(target=target, out=out):
            return target < 0 or committed_rows(out) >= target

        if kill_when(proc, ready, delay):
            landed += 1
            mid_write += 0 < committed_rows(out) < total
    assert landed >= 18, f"only {landed} of 20 kills landed before the collect finished by itself"
    assert mid_write >= 15
    assert not open_store(out).complete
    finished = subprocess.run(COLLECT + ["--out", str(out)], capture_output=True, text=True, env=ENV)
    assert finished.returncode == 0, finished.stderr
    assert tree_bytes(out) == tree_bytes(whole_store)  # no stray file either


TRAIN = [
    "--width",
    "64",
    "--k",
    "4",
    "--tokens",
    str(120 * 256),
    "--batch-size",
    "256",
    "--log-every",
    "5",
    "--checkpoint-every",
    "10",
    "--no-progress",
    "--lr",
    "1e-3",
]


def read_log(run: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line]
    except (OSError, json.JSONDecodeError):
        return []


@pytest.fixture(scope="module")
def rows_store(tmp_path_factory):
    rng = np.random.default_rng(0)
    train = (rng.standard_normal((8192, 16)) * np.linspace(0.5, 3, 16)).astype(np.float32)
    path = tmp_path_factory.mktemp("train") / "s.zarr"
    write_array_store(path, train, train[:256], hook="h", chunk_rows=1024)
    return path


def test_train_killed_mid_run_resumes_to_the_uninterrupted_weights(rows_store, tmp_path):
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(rows_store), *TRAIN]
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, capture_output=True, env=ENV)
    run = tmp_path / "cut"
    rng = np.random.default_rng(7)
    kills = 0
    for target in sorted(rng.integers(12, 110, 3)):
        flags = ["--resume"] if (run / run_dir.CHECKPOINT).exists() else ["--overwrite"] if run.exists() else []
        proc = subprocess.Popen(
            cmd + ["--out", str(run), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
        )
        kills += kill_when(proc, lambda t=target: any(r["step"] >= t for r in read_log(run)), rng.uniform(0, 0.05))
    assert kills == 3
    resumed = subprocess.run(cmd + ["--out", str(run), "--resume"], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    from safetensors.numpy import load_file

    whole, cut = load_file(tmp_path / "whole" / "sae.safetensors"), load_file(run / "sae.safetensors")
    for name in whole:  # CPU training is deterministic: equal, not close
        np.testing.assert_array_equal(cut[name], whole[name], err_msg=name)
    assert [r["step"] for r in read_log(run)] == list(range(5, 121, 5))  # none twice, none missing
    assert not (run / run_dir.CHECKPOINT).exists()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_a_full_disk_stops_collect_cleanly_and_it_completes_after_space_is_freed(whole_store, tmp_path):
    volume = tmp_path / "small"
    # Room for the 3.4 MB of activations collect checks for before it starts (stages/collect/room.py), not
    # for the whole store (about 5.5 MB of tmpfs pages): the disk fills mid-collect, as when another
    # process takes the space.
    if not _mount_tmpfs(volume, "3600k"):
        if os.environ.get("CI"):
            pytest.fail("CI must be able to mount a small tmpfs (run as root) for the disk-full test")
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = volume / "s.zarr"
        full = subprocess.run(COLLECT + ["--out", str(out)], capture_output=True, text=True, env=ENV)
        assert full.returncode != 0
        lines = full.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("error: no space left on device"), full.stderr[-2000:]
        assert "re-run" in lines[-1] and "Traceback" not in full.stderr
        stopped = open_store(out)  # what was committed is a readable, resumable store
        assert not stopped.complete and stopped.n_rows("train") > 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(volume)], check=True)
        resumed = subprocess.run(COLLECT + ["--out", str(out)], capture_output=True, text=True, env=ENV)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming" in resumed.stderr
        assert tree_bytes(out) == tree_bytes(whole_store)
    finally:
        subprocess.run(["umount", str(volume)], capture_output=True)


@pytest.mark.parametrize("damage", ["root", "array", "chunk"])
def test_damaged_metadata_or_chunks_are_named_and_training_refuses(whole_store, tmp_path, damage):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(whole_store, store)
    target = {
        "root": store / "zarr.json",
        "array": store / "train" / "acts" / HOOK / "zarr.json",
        "chunk": store / "train" / "acts" / HOOK / "c" / "1" / "0",
    }[damage]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # truncated, as by a copy cut short
    named = {  # the file c/1/0 is shard 1: chunks 4 to 7 (cli_args: four chunks a shard)
        "root": "zarr.json",
        "array": f"train/acts/{HOOK}/zarr.json",
        "chunk": f"chunk 4 of train/acts/{HOOK}",
    }[damage]
    for command in (["store", "verify", str(store)], ["train", str(store), "--out", str(tmp_path / "run"), *TRAIN]):
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *command], capture_output=True, text=True, env=ENV
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert named in result.stdout + result.stderr, result.stdout + result.stderr
    assert not (tmp_path / "run" / "sae.safetensors").exists()


def test_a_resumed_collect_removes_the_temporary_file_a_kill_left(whole_store, tmp_path):
    """Zarr writes each file as a `.partial` temporary renamed into place: a kill in between leaves it,
    and the resumed store must not keep it (it would be copied and shared)."""
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(whole_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["saepipe"]["complete"] = False  # killed after its last block, before finishing
    (store / "zarr.json").write_text(json.dumps(meta))
    leftover = store / "train" / "acts" / HOOK / "c" / "0" / "0.2b7e.partial"
    leftover.write_bytes(b"half a chunk")
    resumed = subprocess.run(COLLECT + ["--out", str(store)], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    assert tree_bytes(store) == tree_bytes(whole_store)
