"""Collect across dask workers: a local cluster of 2 worker processes writes the very bytes of a
single-process collect, and a collect interrupted either way resumes either way, bit-identical."""

import os
import shutil
from pathlib import Path

import pytest

from stages.basics.errors import SaepipeError
from stages.collect import on_dask as collect_dask
from stages.collect import run_collect
from stages.collect.config import CollectConfig
from store_schema.reader import open_store
from store_schema.writer import StoreWriter
from tests.helpers.cli import run_catching
from tests.helpers.collect import SMALL as SHARDED
from tests.helpers.files import tree_bytes

# dask workers write a file per chunk (chunks of one shard would be written side by side), and so does
# the single-process collect they are compared with
SMALL = {**SHARDED, "shard_chunks": 1}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The local cluster `--workers 2` starts (2 worker processes, one thread each), kept for the module."""
    with collect_dask.connect(CollectConfig(out=str(tmp_path_factory.mktemp("unused")), workers=2)) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "s.zarr"
    run_collect(CollectConfig(out=str(out), **SMALL))
    return out


@pytest.fixture
def commits(monkeypatch):
    """Rows committed after each commit (client side), and a way to interrupt the collect at a commit."""
    seen, stop_at = [], []
    real = StoreWriter.commit_block

    def commit_block(self, split, *args):
        if stop_at and len(seen) == stop_at[0]:
            raise KeyboardInterrupt  # as from Ctrl-C, between two commits
        real(self, split, *args)
        seen.append((split, self.progress(split).rows_committed))

    monkeypatch.setattr(StoreWriter, "commit_block", commit_block)
    return seen, stop_at


def test_two_worker_processes_write_the_single_process_store_bit_for_bit(client, reference, tmp_path, commits):
    assert list(client.nthreads().values()) == [1, 1]
    assert len(set(client.run(os.getpid).values())) == 2  # two processes, not threads
    out = tmp_path / "dask.zarr"
    run_collect(CollectConfig(out=str(out), scheduler=client.scheduler.address, **SMALL))

    assert tree_bytes(out) == tree_bytes(reference)  # every chunk and the root attributes
    seen, _ = commits
    train = [rows for split, rows in seen if split == "train"]
    assert len(train) >= 8 and any(rows % 256 for rows in train[:-1])  # chunks shared by two blocks
    loaded = client.run(lambda: collect_dask._model is not None)
    assert all(loaded.values()), loaded  # both workers ran forward passes


@pytest.mark.parametrize("first, then", [("dask", "single"), ("single", "dask"), ("dask", "dask")])
def test_an_interrupted_collect_resumes_either_way_bit_identical(client, reference, tmp_path, commits, first, then):
    where = {"dask": {"scheduler": client.scheduler.address}, "single": {}}
    cfg = CollectConfig(out=str(tmp_path / "s.zarr"), **SMALL)
    seen, stop_at = commits
    stop_at.append(3)
    with pytest.raises(KeyboardInterrupt):
        run_collect(CollectConfig(**{**vars(cfg), **where[first]}))
    cut = open_store(cfg.out)
    assert not cut.complete and cut.n_rows("train") == seen[-1][1] > 0

    stop_at.clear()
    run_collect(CollectConfig(**{**vars(cfg), **where[then]}))
    assert tree_bytes(Path(cfg.out)) == tree_bytes(reference)


def test_an_append_on_workers_writes_the_single_process_append(client, reference, tmp_path):
    single, dask = tmp_path / "single.zarr", tmp_path / "dask.zarr"
    for path, where in ((single, {}), (dask, {"scheduler": client.scheduler.address})):
        shutil.copytree(reference, path)
        run_collect(CollectConfig(out=str(path), tokens=9000, append=True, progress=False, **where))
    assert open_store(dask).header.token_budget == 9000
    assert tree_bytes(dask) == tree_bytes(single)


def test_a_workers_error_is_the_one_line_error_of_a_single_process_collect(client, tmp_path):
    out = tmp_path / "s.zarr"
    with pytest.raises(SaepipeError, match="unknown hook 'blocks.9.hook_resid_post' for tiny-random"):
        run_collect(
            CollectConfig(
                out=str(out), scheduler=client.scheduler.address, **{**SMALL, "hooks": ("blocks.9.hook_resid_post",)}
            )
        )
    assert not out.exists()


def test_a_sharded_store_is_not_continued_on_workers_and_stays_as_it_was(client, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"

    def interrupted(self, *args):
        raise KeyboardInterrupt

    real = StoreWriter.commit_blocks
    monkeypatch.setattr(
        StoreWriter,
        "commit_blocks",
        lambda self, split, blocks, rows=None: (
            real(self, split, blocks, rows) if self.progress(split).rows_committed == 0 else interrupted(self)
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        run_collect(CollectConfig(out=str(out), **SHARDED))
    monkeypatch.setattr(StoreWriter, "commit_blocks", real)
    before = tree_bytes(out)
    with pytest.raises(SaepipeError, match="keeps its rows in shards of 1,024 rows.*continue it without --workers"):
        run_collect(CollectConfig(out=str(out), scheduler=client.scheduler.address, **SMALL))
    assert tree_bytes(out) == before
    with pytest.raises(SaepipeError, match="--shard-chunks 4 with --workers/--scheduler"):
        CollectConfig(out=str(out), workers=2, **SHARDED).validate()


def test_workers_and_scheduler_together_are_refused(tmp_path):
    result = run_catching(
        "collect",
        "--model",
        "tiny-random",
        "--out",
        str(tmp_path / "s.zarr"),
        "--workers",
        "2",
        "--scheduler",
        "tcp://127.0.0.1:8786",
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --workers and --scheduler exclude each other: --workers N starts a local cluster, "
        "--scheduler ADDRESS uses a running one; pick one"
    ]
    assert not (tmp_path / "s.zarr").exists()
    result = run_catching("collect", "--out", str(tmp_path / "s.zarr"), "--workers", "0")
    assert result.exit_code == 2 and "--workers must be at least 1, got 0" in result.output


def test_chunk_parts_give_each_chunk_to_one_writer():
    assert collect_dask.chunk_parts(0, 600, 256) == [(0, 512, True), (512, 600, False)]
    assert collect_dask.chunk_parts(600, 620, 256) == [(0, 168, False), (168, 424, True), (424, 620, False)]
    assert collect_dask.chunk_parts(700, 50, 256) == [(0, 50, False)]
    assert collect_dask.chunk_parts(768, 256, 256) == [(0, 256, True)]
    assert collect_dask.chunk_parts(10, 0, 256) == []
    for start in range(0, 600, 37):
        for n in (1, 100, 255, 256, 257, 1000):
            parts = collect_dask.chunk_parts(start, n, 256)
            assert [lo for lo, _, _ in parts] == [0] + [hi for _, hi, _ in parts[:-1]] and parts[-1][1] == n
            for lo, hi, whole in parts:
                first, last = (start + lo) // 256, (start + hi - 1) // 256
                assert (start + lo) % 256 == 0 and (hi - lo) % 256 == 0 if whole else first == last


def test_local_workers_share_the_gpus_of_a_node():
    assert [collect_dask.worker_device("auto", i, 4) for i in range(5)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
        "cuda:0",
    ]
    assert collect_dask.worker_device("cuda", 1, 2) == "cuda:1"
    assert collect_dask.worker_device("auto", 3, 1) == "auto"  # one visible GPU (CUDA_VISIBLE_DEVICES, dask-cuda)
    assert collect_dask.worker_device("auto", "tcp://10.0.0.5:4321", 4) == "auto"  # not a local cluster's worker
    assert collect_dask.worker_device("cpu", 1, 4) == "cpu" and collect_dask.worker_device("cuda:2", 0, 4) == "cuda:2"


def test_the_workers_model_summary_gives_the_forward_path_of_its_own_hooks_only():
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    summary = collect_dask.WorkerModelSummary(
        name="m",
        revision="r",
        d_model=8,
        n_layers=2,
        tokenizer=None,
        hooks=hooks,
        n_ctx=16,
        hook_widths=dict.fromkeys(hooks, 8),
        forward="hf-sdpa",
    )
    assert summary.forward_path(hooks[::-1]) == "hf-sdpa" and summary.hook_width(hooks[1]) == 8
    with pytest.raises(ValueError, match="summarized for hooks"):
        summary.forward_path(hooks[:1])  # another hook set may take another forward pass


def test_an_unreachable_scheduler_is_named(tmp_path):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(SaepipeError, match=r"cannot reach the dask scheduler at tcp://127.0.0.1:9 .*--scheduler"):
            run_collect(CollectConfig(out=str(tmp_path / "s.zarr"), scheduler="tcp://127.0.0.1:9", **SMALL))
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / ".s.zarr.lock").exists()
