"""Commits on shard boundaries (stages.collect.commits): every shard file is written once, a commit can end
inside a block, a collect stopped at such a commit resumes bit-identical, and a sharded store holds the
very rows and statistics of an unsharded one."""

import json

import numpy as np
import pytest
import zarr

from stages.collect import run_collect
from stages.collect.config import CollectConfig
from store_schema import chunk_files, schema
from store_schema.reader import open_store
from store_schema.writer import StoreWriter
from tests.helpers.collect import SETTINGS
from tests.helpers.files import tree_bytes

TOKENS = 9000


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "s.zarr"
    run_collect(CollectConfig(out=str(out), tokens=TOKENS, **SETTINGS))
    return out


def _progress(store) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["saepipe"]["progress"]


def test_every_shard_file_of_the_rows_is_written_once(tmp_path, monkeypatch):
    real, written = chunk_files._planned_file, []

    def counted(raw, index, *args, **kwargs):
        written.append((raw.path, index))
        return real(raw, index, *args, **kwargs)

    monkeypatch.setattr(chunk_files, "_planned_file", counted)
    out = tmp_path / "s.zarr"
    run_collect(CollectConfig(out=str(out), tokens=TOKENS, **SETTINGS))
    store = open_store(out)
    assert store.header.shard_rows == 4 * 256 and store.header.schema_version == schema.FIRST_SHARDED_VERSION
    assert len(written) == len(set(written)), "a shard file was written twice"
    shards = -(-store.n_rows("train") // 1024)
    assert {(path, i) for path, i in written if path == f"train/acts/{SETTINGS['hooks'][0]}"} == {
        (f"train/acts/{SETTINGS['hooks'][0]}", i) for i in range(shards)
    }


def test_a_collect_stopped_at_a_commit_inside_a_block_resumes_bit_identical(whole, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    real, heads = StoreWriter.commit_blocks, []

    def commit_blocks(self, split, blocks, rows_committed=None):
        real(self, split, blocks, rows_committed)
        progress = self.progress(split)
        if progress.rows_committed > progress.block_rows:
            heads.append(progress)
            if len(heads) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "commit_blocks", commit_blocks)
    with pytest.raises(KeyboardInterrupt):
        run_collect(CollectConfig(out=str(out), tokens=TOKENS, **SETTINGS))
    monkeypatch.setattr(StoreWriter, "commit_blocks", real)

    train = _progress(out)["train"]
    assert train["rows_committed"] % 1024 == 0 and train["rows_in_blocks"] < train["rows_committed"]
    cut, full = open_store(out), open_store(whole)
    assert not cut.complete and cut.n_rows("train") == train["rows_committed"]
    for hook in SETTINGS["hooks"]:  # the committed head of the block in flight reads as the finished store's
        np.testing.assert_array_equal(
            cut.read_rows("train", hook), full.read_rows("train", hook, 0, cut.n_rows("train"))
        )
        assert cut.running_stats("train", hook).count == train["rows_in_blocks"]

    run_collect(CollectConfig(out=str(out), tokens=TOKENS, **SETTINGS))
    assert tree_bytes(out) == tree_bytes(whole)


def test_a_sharded_store_holds_the_rows_and_statistics_of_an_unsharded_one(whole, tmp_path):
    flat = tmp_path / "flat.zarr"
    run_collect(CollectConfig(out=str(flat), tokens=TOKENS, **{**SETTINGS, "shard_chunks": 1}))
    sharded, unsharded = zarr.open_group(str(whole), mode="r"), zarr.open_group(str(flat), mode="r")
    assert open_store(flat).header.shard_rows is None
    for split in schema.SPLITS:
        for name in schema.row_array_names(open_store(whole).header, split):
            assert sharded[name].shards is not None and unsharded[name].shards is None
            np.testing.assert_array_equal(sharded[name][:], unsharded[name][:], err_msg=name)
        for hook in SETTINGS["hooks"]:
            ours, theirs = open_store(whole).running_stats(split, hook), open_store(flat).running_stats(split, hook)
            assert ours.count == theirs.count and ours.sum_sq_norm == theirs.sum_sq_norm
            np.testing.assert_array_equal(ours.total, theirs.total)
    files = lambda path: sum(1 for p in path.rglob("*") if p.is_file())  # noqa: E731
    assert files(whole) < files(flat)


def test_rows_in_reused_host_buffers_are_copied_before_they_are_held(whole, tmp_path, monkeypatch):
    """From a GPU, a block's rows sit in HostStaging's pinned buffers, which a later block fills again.
    Here every block's rows are marked so, and overwritten as soon as the writer is done with them: the
    rows held for the next commit must have been copied, or the store would hold the garbage."""
    from stages.collect import blocks, local
    from stages.collect.commits import ShardAlignedCommits

    real_prepare, real_add = blocks.prepare_rows, ShardAlignedCommits.add

    def borrowed_rows(*args, **kwargs):
        rows = real_prepare(*args, **kwargs)
        rows.borrowed = True
        return rows

    def add_then_refill(self, split, rows, last_of_split, summary):
        real_add(self, split, rows, last_of_split, summary)
        for acts in rows.acts.values():
            acts[...] = np.float16(7.0)  # the staging buffer, filled by a later block
        rows.row_context[...] = -5

    monkeypatch.setattr(local, "prepare_rows", borrowed_rows)
    monkeypatch.setattr(ShardAlignedCommits, "add", add_then_refill)
    out = tmp_path / "s.zarr"
    run_collect(CollectConfig(out=str(out), tokens=TOKENS, **SETTINGS))
    assert tree_bytes(out) == tree_bytes(whole)
