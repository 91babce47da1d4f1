"""Collect reads each block's tokens from a scratch copy rather than holding the corpus: the rows it
reads must be the store's, the stored-position counts must match the schema's, and a store whose token
pieces fail midway must leave nothing behind."""

import numpy as np
import pytest
import zarr

from stages.collect.context_tokens import ContextTokens
from store_schema import schema
from store_schema.writer import StoreWriter


@pytest.fixture
def tokens_array(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(2500, 7), dtype=np.int32)  # 2,500 contexts: three chunks, the last partial
    arr = zarr.create_array(str(tmp_path / "t.zarr"), shape=tokens.shape, chunks=(1024, 7), dtype="int32")
    arr[:] = tokens
    return arr, tokens


def test_reads_any_contexts_in_any_order(tokens_array):
    arr, tokens = tokens_array
    picks = np.random.default_rng(1).permutation(len(tokens))[:700]
    with ContextTokens(arr, drop_first=1, excluded_tokens=[3, 4]) as scratch:
        got, keep = scratch.read(picks)
        assert np.array_equal(got, tokens[picks])
        expected_keep = schema.stored_positions(tokens, 1, [3, 4])
        assert np.array_equal(keep, expected_keep[picks])
        assert np.array_equal(scratch.stored_counts, expected_keep.sum(axis=1))
        with pytest.raises(IndexError, match="not one of the store's 2500"):
            scratch.read(np.array([2500]))


def _header(n_contexts: int) -> dict:
    return schema.new_header(
        writer="test", config_fingerprint="f", collect_config={}, model={"name": "m"}, text_source={"name": "t"},
        tokenizer={}, context_size=4, dropped_positions=[0], excluded_tokens=[9], outlier_factor=None, hooks=["h"],
        d_model=8, token_budget=n_contexts, shuffle={}, split={}, normalization_mode="none", warmup_rows=0,
        nonfinite_policy="skip",
    )  # fmt: skip


def test_store_from_token_pieces_matches_one_array(tmp_path):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 12, size=(3000, 4), dtype=np.int32)
    split = schema.assign_split(3000, 0.1, 0)
    whole = StoreWriter.create(tmp_path / "whole.zarr", _header(3000), tokens, split, chunk_rows=64)
    pieces = (tokens[i : i + 1024] for i in range(0, 3000, 1024))
    streamed = StoreWriter.create(tmp_path / "pieces.zarr", _header(3000), pieces, split, chunk_rows=64)
    assert streamed.header == whole.header
    assert streamed.header.text_source["tokens_fingerprint"] == schema.tokens_fingerprint(tokens)
    assert streamed.header.planned_rows == schema.planned_rows(tokens, split, 1, [9])
    assert np.array_equal(streamed.group[schema.TOKENS][:], tokens)


def test_failing_token_pieces_leave_no_store_and_no_temporary(tmp_path):
    def pieces():
        yield np.ones((1024, 4), np.int32)
        raise RuntimeError("the text source broke")

    with pytest.raises(RuntimeError, match="broke"):
        StoreWriter.create(tmp_path / "s.zarr", _header(3000), pieces(), np.zeros(3000, np.int8), chunk_rows=64)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="hold 1024 contexts, not the 3000"):
        StoreWriter.create(
            tmp_path / "s.zarr", _header(3000), np.ones((1024, 4), np.int32), np.zeros(3000, np.int8), 64
        )
    assert list(tmp_path.iterdir()) == []
