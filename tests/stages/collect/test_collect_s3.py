"""A collect straight into S3 (moto on loopback): the bucket ends with the very bytes of a local collect,
local scratch stays bounded, a killed collect resumes on another machine, and the lease keeps two
collects apart across processes, stopping one whose lease was taken without losing a committed block."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.collect import run_collect
from stages.collect.config import CollectConfig
from store_schema.mirror import RemoteMirror
from tests.helpers.collect import HOOKS, SETTINGS, cli_args
from tests.helpers.s3 import moto_bucket, objects

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

REPO = Path(__file__).resolve().parents[3]
TOKENS = 12_000  # about twenty training blocks, in eleven shards
SHARD_ROWS = SETTINGS["chunk_rows"] * SETTINGS["shard_chunks"]


@pytest.fixture(scope="module")
def local_bytes(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "s.zarr"
    run_collect(CollectConfig(out=str(out), tokens=TOKENS, **SETTINGS))
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEPIPE_CACHE", str(tmp_path / "cache"))
    with moto_bucket() as (url, env):
        yield url, env


def _cli(env: dict, cache: Path, lease_seconds: float, url: str) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "pipeline.cli", "collect", *cli_args(*HOOKS, tokens=TOKENS), "--out", url]
    return command, {
        **os.environ,
        **env,
        "PYTHONPATH": str(REPO),
        "SAEPIPE_CACHE": str(cache),
        "SAEPIPE_LEASE_SECONDS": str(lease_seconds),
    }


def _committed_rows(url: str) -> int:
    import s3fs

    try:
        root = json.loads(s3fs.S3FileSystem().cat_file(url.removeprefix("s3://") + "/zarr.json"))
    except FileNotFoundError:
        return 0
    header = root.get("attributes", {}).get("saepipe", {})
    return header.get("progress", {}).get("train", {}).get("rows_committed", 0)


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_bucket_gets_the_local_bytes_with_bounded_scratch(bucket, local_bytes, monkeypatch):
    url, _ = bucket
    row_chunks_after_sync, token_chunks_after_sync = [], []
    sync = RemoteMirror.sync

    def counting_sync(self, writer):
        sync(self, writer)
        row_chunks_after_sync.append(
            max(len(list((self.staging / name / "c").glob("*"))) for name in ("train/row_context", "eval/row_context"))
        )
        token_chunks_after_sync.append(len([p for p in (self.staging / "tokens").rglob("c/*/*") if p.is_file()]))

    monkeypatch.setattr(RemoteMirror, "sync", counting_sync)
    run_collect(CollectConfig(out=f"{url}/s.zarr", tokens=TOKENS, **SETTINGS))
    assert objects(f"{url}/s.zarr") == local_bytes  # every object, byte for byte; nothing else
    assert sorted(objects(url)) == [f"s.zarr/{name}" for name in sorted(local_bytes)]  # the lease is gone
    # the shard being filled, and those of the one commit on its way to the bucket (a commit writes whole
    # shards: those a block and the rows held before it fill)
    shards_per_commit = -(-SETTINGS["shuffle_buffer_rows"] // SHARD_ROWS) + 1
    assert len(row_chunks_after_sync) > 10 and max(row_chunks_after_sync) <= 2 + shards_per_commit
    # the tokens are not kept twice: their chunks leave the staging store once the first commit is in the bucket
    assert token_chunks_after_sync[0] > 0 and token_chunks_after_sync[2:] == [0] * len(token_chunks_after_sync[2:])
    assert not any((Path(os.environ["SAEPIPE_CACHE"]) / "staging").iterdir())  # staging removed


@pytest.mark.parametrize("failing", ["eval/zarr.json", "train/row_context/c/3"])  # the first commit's, a later one's
def test_a_failed_upload_stops_the_collect_and_the_bucket_keeps_whole_commits(
    bucket, local_bytes, monkeypatch, failing
):
    url, _ = bucket
    upload = RemoteMirror._upload

    def failing_upload(self, relative):
        if relative == failing:
            raise OSError("connection reset by peer")
        upload(self, relative)

    monkeypatch.setattr(RemoteMirror, "_upload", failing_upload)
    with pytest.raises(OSError, match="connection reset"):
        run_collect(CollectConfig(out=f"{url}/s.zarr", tokens=TOKENS, **SETTINGS))
    remote = objects(f"{url}/s.zarr")
    assert failing not in remote
    if "zarr.json" in remote:  # what the bucket's root counts is there, byte for byte as a local collect's
        root = json.loads(remote["zarr.json"])["attributes"]["saepipe"]
        for split in ("train", "eval"):
            full = root["progress"][split]["rows_committed"] // SHARD_ROWS
            for name in (f"{split}/row_context", *(f"{split}/acts/{hook}" for hook in HOOKS)):
                for chunk in range(full):
                    key = f"{name}/c/{chunk}" + ("/0" if "/acts/" in name else "")
                    assert remote[key] == local_bytes[key], key
        assert all(
            remote[name] == local_bytes[name] for name in remote if name.endswith("zarr.json") and name != "zarr.json"
        )
    else:
        assert failing == "eval/zarr.json"  # the first commit's file failed: the bucket holds no store yet
    monkeypatch.setattr(RemoteMirror, "_upload", upload)
    run_collect(CollectConfig(out=f"{url}/s.zarr", tokens=TOKENS, **SETTINGS))  # resumes, or starts anew
    assert objects(f"{url}/s.zarr") == local_bytes


def test_killed_collect_resumes_on_another_machine(bucket, local_bytes, tmp_path):
    url, env = bucket
    store = f"{url}/s.zarr"
    lease = 8.0  # longer than the second collect's start-up, so that it finds the lease live
    command, first_env = _cli(env, tmp_path / "machine-a", lease, store)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=first_env)
    _wait_for(lambda: _committed_rows(store) > 0)
    proc.send_signal(signal.SIGKILL)
    killed = time.time()
    proc.wait()
    assert objects(store) != local_bytes  # cut part-way

    command, second_env = _cli(env, tmp_path / "machine-b", lease, store)
    refused = subprocess.run(command, capture_output=True, text=True, env=second_env)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "is being written by" in refused.stderr and "lease" in refused.stderr
    time.sleep(max(0.0, killed + lease + 0.5 - time.time()))  # the killed collect's lease expires: taken over
    resumed = subprocess.run(command, capture_output=True, text=True, env=second_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "took over the expired lease" in resumed.stderr and "resuming" in resumed.stderr
    assert objects(store) == local_bytes


def test_a_collect_whose_lease_was_taken_stops_and_loses_nothing(bucket, local_bytes, tmp_path):
    url, env = bucket
    store = f"{url}/s.zarr"
    command, first_env = _cli(env, tmp_path / "machine-a", 1.0, store)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=first_env, text=True)
    _wait_for(lambda: _committed_rows(store) > 0)
    first.send_signal(signal.SIGSTOP)  # a paused machine: its lease is not renewed
    time.sleep(1.3)
    command, second_env = _cli(env, tmp_path / "machine-b", 1.0, store)
    second = subprocess.run(command, capture_output=True, text=True, env=second_env)
    assert second.returncode == 0, second.stderr
    assert objects(store) == local_bytes
    first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [stderr.strip().splitlines()[-1]] and "this collect stopped" in errors[0], stderr
    assert objects(store) == local_bytes  # the stopped collect changed nothing


def test_a_full_scratch_disk_stops_the_collect_and_it_resumes(bucket, local_bytes, tmp_path):
    url, env = bucket
    store = f"{url}/s.zarr"
    scratch = tmp_path / "small"
    scratch.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(scratch)], capture_output=True)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must be able to mount a small tmpfs (run as root) for the disk-full test")
        pytest.skip("mounting a tmpfs needs root")
    try:
        command, cli_env = _cli(env, scratch, 60, store)
        full = subprocess.run(command, capture_output=True, text=True, env=cli_env)
        lines = full.stderr.strip().splitlines()
        assert full.returncode != 0 and lines[-1].startswith("error: no space left on device"), full.stderr[-2000:]
        assert "Traceback" not in full.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(scratch)], check=True)
        resumed = subprocess.run(command, capture_output=True, text=True, env=cli_env)
        assert resumed.returncode == 0, resumed.stderr
        assert objects(store) == local_bytes
    finally:
        subprocess.run(["umount", str(scratch)], capture_output=True)
