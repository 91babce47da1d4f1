"""Checksums end to end: `saepipe store verify` names every damaged or missing chunk of a collected
store, and training refuses a damaged chunk with its name."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from store_schema.lock import lock_path
from tests.helpers.cli import HOOK, collect_args, run_catching, run_ok
from tests.helpers.files import inner_chunk, rewrite_checksummed


def test_a_fresh_store_verifies(tiny_store):
    result = run_catching("store", "verify", tiny_store, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ") and "warning" not in result.output
    assert int(result.output.split()[1].replace(",", "")) >= 8 + 3  # 8 train act chunks, tokens, splits...


def test_an_incomplete_store_verifies_with_a_note_that_it_is_not_finished(tiny_store, tmp_path):
    """What an interrupted collect committed is sound, and verify says so; it also says the store is not
    one to train on yet, where "ok" alone read as a finished store."""
    from store_schema.writer import StoreWriter

    store = Path(shutil.copytree(tiny_store, tmp_path / "s.zarr"))
    StoreWriter.open(store)._update(complete=False)
    result = run_catching("store", "verify", store, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")
    assert (
        "note: the store is incomplete (" in result.output and "re-running the same `saepipe collect`" in result.output
    )


@pytest.mark.parametrize("shard_chunks", [1, 2])
def test_flipped_bytes_and_a_missing_chunk_are_named_and_training_refuses(tiny_store, tmp_path, shard_chunks):
    store = tmp_path / "damaged.zarr"
    if shard_chunks == 1:
        shutil.copytree(tiny_store, store)
    else:  # the same collect, two chunks to a shard file
        run_ok(*collect_args(4000, shard_chunks=shard_chunks), "--out", store)
    for chunk in (3, 5):
        path, offset = inner_chunk(store, f"train/acts/{HOOK}", chunk)
        data = bytearray(path.read_bytes())
        data[offset + 512 * 64] ^= 0x01  # a byte inside the chunk's rows (512 rows of d 64, fp16)
        path.write_bytes(bytes(data))
    (store / "train" / "row_position" / "c" / "1").unlink()  # chunk 1, or the shard of chunks 2 and 3
    result = run_catching("store", "verify", store, "--no-progress")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert f"chunk 3 of train/acts/{HOOK} fails its checksum" in lines
    assert f"chunk 5 of train/acts/{HOOK} fails its checksum" in lines
    missing = [1] if shard_chunks == 1 else [2, 3]
    assert all(f"chunk {i} of train/row_position is missing" in lines for i in missing)
    assert lines[-1].startswith(f"error: {2 + len(missing)} damaged chunk(s)")

    out = tmp_path / "run"
    result = run_catching(
        "train",
        store,
        "--width",
        "32",
        "--k",
        "4",
        "--tokens",
        "20000",
        "--batch-size",
        "256",
        "--out",
        out,
        "--no-progress",
    )
    assert result.exit_code == 2, result.output
    assert f"of train/acts/{HOOK} in {store} fails its checksum" in result.output.strip().splitlines()[-1]
    assert not (out / "sae.safetensors").exists()


COLLECT = collect_args(2000, warmup_rows=500)


def test_a_second_collect_on_a_store_being_written_refuses(tmp_path):
    from store_schema.lock import StoreLock

    store = tmp_path / "s.zarr"
    with StoreLock(store):  # this test process is the collect in progress
        result = run_catching(*COLLECT, "--out", store)
        assert result.exit_code == 2, result.output
        line = result.output.strip().splitlines()[-1]
        assert f"store {store} is being written by pid {os.getpid()} on {socket.gethostname()}" in line
        assert not store.exists()
    assert run_catching(*COLLECT, "--out", store).exit_code == 0  # released on exit
    assert not lock_path(store).exists()


def test_folders_made_to_hold_a_lock_go_again_when_nothing_else_was_written(tmp_path):
    """A sweep's runs lock beside themselves, inside the sweep's folder: a sweep refused before training
    leaves no empty folder behind; one that wrote its runs keeps them."""
    from store_schema.lock import StoreLock

    with StoreLock(tmp_path / "sweep" / "deep" / "k=4", kind="run folder"):
        assert lock_path(tmp_path / "sweep" / "deep" / "k=4").exists()
    assert list(tmp_path.iterdir()) == []
    with StoreLock(tmp_path / "sweep" / "k=4", kind="run folder"):
        (tmp_path / "sweep" / "k=4").mkdir()
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["k=4"]


def test_a_store_whose_collect_has_not_created_it_yet_says_so(tmp_path):
    """While a collect packs its text the store does not exist yet, but its lock does: a train or verify
    then names the collect, not "run saepipe collect first"."""
    from store_schema.lock import StoreLock

    store = tmp_path / "s.zarr"
    with StoreLock(store):
        result = run_catching("store", "verify", store, "--no-progress")
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and f"no store at {store} yet: a collect (pid {os.getpid()} on" in line, line
    assert "wait for it to finish" in line
    assert "run `saepipe collect" in run_catching("store", "verify", store).output  # no lock: no collect


def test_a_stale_lock_is_taken_over_and_a_foreign_one_is_not(tmp_path):
    store = tmp_path / "s.zarr"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # that process has exited
    lock_path(store).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "earlier"}))
    result = run_catching(*COLLECT, "--out", store)
    assert result.exit_code == 0, result.output
    assert "taking over the stale lock" in result.output and not lock_path(store).exists()

    other = tmp_path / "t.zarr"
    lock_path(other).write_text(json.dumps({"pid": 1, "host": "another-machine", "started": "earlier"}))
    result = run_catching(*COLLECT, "--out", other)
    assert result.exit_code == 2 and f"remove {lock_path(other)}" in result.output


def test_non_finite_rows_and_reordered_tokens_with_good_checksums_are_named(tiny_store, tmp_path):
    import numpy as np
    from numcodecs import Zstd

    store = tmp_path / "edited.zarr"
    shutil.copytree(tiny_store, store)
    chunk = store / "train" / "acts" / HOOK / "c" / "0" / "0"
    rows = np.frombuffer(chunk.read_bytes()[:-4], np.float16).copy()
    rows[:64] = np.inf
    rows[100] = np.nan
    rewrite_checksummed(chunk, rows.tobytes())
    tokens_chunk = store / "tokens" / "c" / "0" / "0"
    raw = Zstd().decode(tokens_chunk.read_bytes()[:-4])
    meta = json.loads((store / "tokens" / "zarr.json").read_text())
    contexts = np.frombuffer(raw, np.int32).reshape(-1, meta["shape"][1])
    swapped = contexts[[1, 0, *range(2, len(contexts))]]  # two contexts trade places
    rewrite_checksummed(tokens_chunk, bytes(Zstd().encode(swapped.tobytes())))

    result = run_catching("store", "verify", store, "--no-progress")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert f"chunk 0 of train/acts/{HOOK} holds 65 non-finite values (NaN or inf) in committed rows" in lines
    assert any(line.startswith("tokens does not match the fingerprint recorded") for line in lines), lines
    assert "fails its checksum" not in result.output


def test_a_store_whose_normalization_cannot_be_used_is_refused_at_open(tiny_store, tmp_path):
    import numpy as np
    import zarr

    from store_schema.reader import ActivationStore
    from store_schema.schema import StoreError

    cases = {"scale 0.0": 0, "scale -2.0": -2.0, "1 non-finite values in its mean": None}
    for why, scale in cases.items():
        store = tmp_path / f"{len(why)}.zarr"
        shutil.copytree(tiny_store, store)
        if scale is None:  # the mean array, rewritten through Zarr (its checksum is right)
            mean = zarr.open_array(str(store / "normalization" / HOOK / "mean"), mode="r+")
            values = mean[:]
            values[3] = np.nan
            mean[:] = values
        else:
            root = json.loads((store / "zarr.json").read_text())
            root["attributes"]["saepipe"]["normalization"][HOOK]["scale"] = scale
            (store / "zarr.json").write_text(json.dumps(root))
        try:
            ActivationStore.open(store)
        except StoreError as e:
            assert f"the normalization recorded for {HOOK} is not usable: {why}" in str(e)
            assert "saepipe store verify" in str(e) and "\n" not in str(e)
        else:
            raise AssertionError(f"a store with {why} was opened")
        result = run_catching("store", "verify", store, "--no-progress")
        assert result.exit_code == 2 and "is not usable" in result.output.strip().splitlines()[-1], result.output


def test_a_normalization_that_cannot_be_used_is_never_estimated():
    import pytest
    import torch

    from store_schema.normalization import Normalization

    tiny = torch.zeros(64, 8, dtype=torch.float64)
    tiny[:, 0] = torch.linspace(0, 1e-44, 64, dtype=torch.float64)  # a spread whose inverse overflows float32
    with pytest.raises(ValueError, match="scale inf"):
        Normalization.estimate("center-scale", tiny)
