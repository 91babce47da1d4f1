"""Schema version 2 keeps the root metadata small whatever the corpus, width and hooks (the running sums and
the skipped contexts live in arrays), and stores of version 1 still read."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from store_schema import schema
from store_schema.generated import write_array_store
from store_schema.normalization import Normalization
from store_schema.reader import open_store
from store_schema.verify import verify_store
from store_schema.writer import StoreWriter
from tests.helpers.cli import run_ok

# Collected by saepipe at commit c771279 (schema version 1): `saepipe collect --model tiny-random --dataset
# corpus.txt --hook blocks.1.hook_resid_post --tokens 600 --context-size 16 --chunk-rows 128
# --shuffle-buffer-rows 150 --warmup-rows 200`, corpus.txt being "The quick brown fox jumps over the lazy dog. " x 400.
V1_STORE = Path(__file__).parent / "v1_store" / "store.zarr"


def test_root_metadata_stays_under_64_kib_with_8_hooks_of_width_4096(tmp_path):
    d, hooks = 4096, [f"blocks.{i}.hook_resid_post" for i in range(8)]
    n_contexts = 64
    header = schema.new_header(
        writer="test", config_fingerprint="f", collect_config={"model": "m"}, model={"name": "m"},
        text_source={"name": "t"}, tokenizer={}, context_size=2, dropped_positions=[0], excluded_tokens=[],
        outlier_factor=10.0, hooks=hooks, d_model=d, token_budget=48, shuffle={}, split={},
        normalization_mode="center-scale", warmup_rows=0, nonfinite_policy="skip",
    )  # fmt: skip
    split = np.zeros(n_contexts, np.int8)
    split[-16:] = 1
    writer = StoreWriter.create(tmp_path / "s.zarr", header, np.ones((n_contexts, 2), np.int32), split, chunk_rows=16)
    rng = np.random.default_rng(0)
    writer.record_normalization({h: Normalization("center-scale", rng.standard_normal(d).astype(np.float32), 0.5,
                                                  100.0) for h in hooks})  # fmt: skip
    sizes = []
    for block in range(3):  # three commits per split, each skipping contexts: the metadata must not grow
        for name, n in (("train", 16), ("eval", 4)):
            stats = {}
            for hook in hooks:
                stats[hook] = writer.running_stats(name, hook)
                stats[hook].update(rng.standard_normal((n, d)).astype(np.float16))
            writer.commit(name, block + 1, (block + 1) * n, stats, [block * 10 + i for i in range(50)])
            sizes.append((tmp_path / "s.zarr" / "zarr.json").stat().st_size)
    # bounded, and not growing with the commits (only the digits of the statistics' scalars vary)
    assert max(sizes) < 64 * 1024 and abs(sizes[-1] - sizes[1]) < 100
    store = open_store(tmp_path / "s.zarr")
    assert len(store.skipped_contexts()) == 300 and store.running_stats("eval", hooks[7]).count == 12
    assert np.allclose(store.running_stats("train", hooks[0]).total, writer.running_stats("train", hooks[0]).total)


def test_a_version_1_store_still_reads_verifies_and_trains(tmp_path):
    store = open_store(V1_STORE)
    assert store.header.schema_version == 1 and store.complete
    hook = store.hooks[0]
    rows = store.read_rows("train", hook).astype(np.float64)
    stats = store.running_stats("train", hook)
    assert stats.count == len(rows) == 615 and np.allclose(stats.total, rows.sum(axis=0))
    assert len(store.skipped_contexts()) == 0 and len(store.contexts("train")) == store.header.split.n_train_contexts
    assert verify_store(store, progress=False).damaged == []
    copy = Path(shutil.copytree(V1_STORE, tmp_path / "v1.zarr"))
    run_ok("train", copy, "--width", "16", "--k", "2", "--tokens", "512", "--batch-size", "128",
           "--out", tmp_path / "run", "--no-progress")  # fmt: skip
    assert (tmp_path / "run" / "sae.safetensors").exists()


def test_a_version_1_store_is_not_continued_by_a_version_2_writer(tmp_path):
    copy = shutil.copytree(V1_STORE, tmp_path / "v1.zarr")
    with pytest.raises(schema.StoreError, match="schema version 1, written by an earlier saepipe: it reads as it is"):
        StoreWriter.open(copy)


def test_a_fresh_array_store_verifies(tmp_path):
    rows = np.zeros((300, 8), np.float32)  # all-zero tokens and rows: every chunk is still written
    store = open_store(write_array_store(tmp_path / "s.zarr", rows[:256], rows[256:], hook="h", chunk_rows=128))
    result = verify_store(store, progress=False)
    assert result.damaged == [] and result.checked > 0
