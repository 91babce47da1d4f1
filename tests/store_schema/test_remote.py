"""Stores anywhere: a real S3 protocol server (moto, on loopback) through s3fs, and a read-only HTTP
server; the store copied there and back, verified there, and trained from there, with the same SAE as
training from the local folder."""

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.cli import collect_args, run, run_catching
from tests.helpers.http import served_over_http
from tests.helpers.s3 import moto_bucket

TRAIN = ["--width", "32", "--k", "4", "--tokens", "12000", "--batch-size", "256", "--seed", "1", "--no-progress"]


COLLECT = collect_args(4000)  # the store tiny_store (conftest.py) holds


@pytest.fixture(scope="module")
def collected(tiny_store, tmp_path_factory):
    """The tiny store, collected with COLLECT, and the weights training on it locally gives."""
    local_run = tmp_path_factory.mktemp("remote") / "local-run"
    assert run("train", tiny_store, *TRAIN, "--out", local_run).exit_code == 0
    return tiny_store, load_file(str(local_run / "sae.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture
def s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with moto_bucket() as (url, _):  # a fresh bucket per test: moto's state is per process
        yield url


def test_copy_to_s3_verify_train_and_copy_back(collected, s3, tmp_path):
    local, local_weights = collected
    url = f"{s3}/s.zarr"
    result = run("store", "copy", local, url, "--no-progress")
    assert result.exit_code == 0, result.output
    assert run("store", "verify", url, "--no-progress").output.startswith("ok: ")
    again = run("store", "copy", local, url, "--no-progress")  # resumable: everything is already there
    assert again.exit_code == 0 and "copied 1 files" in again.output  # only the root metadata, always last

    result = run("train", url, *TRAIN, "--out", tmp_path / "s3-run")
    assert result.exit_code == 0, result.output
    assert _same_weights(load_file(str(tmp_path / "s3-run" / "sae.safetensors")), local_weights)

    back = tmp_path / "back.zarr"
    assert run("store", "copy", url, back, "--no-progress").exit_code == 0
    for path in local.rglob("*"):
        if path.is_file():
            assert (back / path.relative_to(local)).read_bytes() == path.read_bytes(), path


def test_collect_to_s3_equals_a_local_collect(collected, s3, tmp_path, monkeypatch):
    """--out s3://...: collected through a staging store mirrored to the bucket at every commit; the objects
    are the bytes of a local collect with the same settings, and a second run finds the store complete."""
    import s3fs

    local, _ = collected
    monkeypatch.setenv("SAEPIPE_CACHE", str(tmp_path / "cache"))
    url = f"{s3}/collected.zarr"
    result = run(*COLLECT, "--out", url)
    assert result.exit_code == 0, result.output
    fs = s3fs.S3FileSystem()
    for path in local.rglob("*"):
        if path.is_file():
            assert fs.cat_file(f"{url}/{path.relative_to(local).as_posix()}") == path.read_bytes()
    assert not any((tmp_path / "cache" / "staging").iterdir())  # the staging store is removed once copied
    again = run(*COLLECT, "--out", url)
    assert again.exit_code == 0 and "already complete" in again.output


def test_an_interrupted_copy_is_not_a_store_and_resumes(collected, tmp_path, monkeypatch):
    import fsspec

    local, _ = collected
    dst = tmp_path / "copy.zarr"
    original = fsspec.implementations.local.LocalFileSystem.pipe_file
    calls = []

    def failing_pipe(self, path, value, *args, **kwargs):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk went away")
        return original(self, path, value, *args, **kwargs)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "pipe_file", failing_pipe)
    result = run("store", "copy", local, dst, "--threads", "1", "--no-progress")
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(
            f"error: copying {local} to {dst} failed (OSError: disk went away): fix that, then run the same command"
        )
    )
    assert not (dst / "zarr.json").exists()
    result = run_catching("info", str(dst))
    assert result.exit_code == 2  # not mistaken for a store
    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "pipe_file", original)
    result = run("store", "copy", local, dst, "--threads", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    copied, skipped = (int(word.replace(",", "")) for word in re.findall(r"([\d,]+) (?:files|already)", result.output))
    assert skipped >= 4 and copied >= 2  # the failed file and the root metadata at least were copied again
    assert run("store", "verify", dst, "--no-progress").exit_code == 0


@pytest.fixture
def http_root(collected):
    pytest.importorskip("aiohttp")
    local, _ = collected
    with served_over_http(local.parent) as url:
        yield url


def test_train_verify_and_copy_from_a_read_only_http_server(collected, http_root, tmp_path):
    local, local_weights = collected
    url = f"{http_root}/{Path(local).name}"
    result = run("info", url)
    assert result.exit_code == 0 and "fingerprint" in result.output
    result = run("train", url, *TRAIN, "--out", tmp_path / "http-run")
    assert result.exit_code == 0, result.output
    assert _same_weights(load_file(str(tmp_path / "http-run" / "sae.safetensors")), local_weights)
    assert run("store", "verify", url, "--no-progress").output.startswith("ok: ")
    # an HTTP listing has no file sizes: the copy still works (it just cannot skip files)
    copy = tmp_path / "from-http.zarr"
    assert run("store", "copy", url, copy, "--no-progress").exit_code == 0
    for path in local.rglob("*"):
        if path.is_file():
            assert (copy / path.relative_to(local)).read_bytes() == path.read_bytes(), path
