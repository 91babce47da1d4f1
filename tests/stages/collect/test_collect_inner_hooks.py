"""Hooks inside attention and the MLP (attn.hook_z, mlp.hook_in, mlp.hook_post), layer sets in --hook, and
stores whose hooks have different widths (schema version 3)."""

import json
import shutil

import numpy as np
import pytest
import torch

from stages import collect as collect_stage
from stages.collect.config import CollectConfig
from store_schema import schema
from store_schema.reader import ActivationStore, open_store
from tests.helpers.cli import expect_error, run
from tests.helpers.collect import SETTINGS, cli_args

INNER = ("blocks.{1-2}.mlp.hook_in", "blocks.{1-2}.hook_mlp_out", "blocks.1.mlp.hook_post", "blocks.2.attn.hook_z")
EXPANDED = [
    "blocks.1.mlp.hook_in",
    "blocks.2.mlp.hook_in",
    "blocks.1.hook_mlp_out",
    "blocks.2.hook_mlp_out",
    "blocks.1.mlp.hook_post",
    "blocks.2.attn.hook_z",
]


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide") / "w.zarr"
    collect_stage.run_collect(CollectConfig(out=str(path), **dict(SETTINGS, hooks=INNER, tokens=3000)))
    return path


def test_layer_sets_expand_and_widths_are_recorded(wide_store):
    store = open_store(wide_store)
    assert store.complete and store.hooks == EXPANDED
    assert store.header.schema_version == 4  # sharded (SETTINGS); unsharded it would be 3
    assert store.header.to_attrs()["hook_widths"] == {"blocks.1.mlp.hook_post": 256}  # only widths other than d_model
    assert store.header.width("blocks.1.mlp.hook_post") == 256 and store.header.width(store.hooks[0]) == store.d_model
    assert [store.width(h) for h in EXPANDED] == [64, 64, 64, 64, 256, 64]
    rows = store.read_rows("train", "blocks.1.mlp.hook_post", 0, 10)
    assert rows.shape == (10, 256)
    assert store.normalization("blocks.1.mlp.hook_post").mean.shape == (256,)
    assert store.running_stats("train", "blocks.1.mlp.hook_post").total.shape == (256,)


def test_inner_rows_are_the_models_activations_row_aligned(wide_store):
    from stages.host_model.loading import load_host_model
    from stages.host_model.model import run_to_hooks

    store = open_store(wide_store)
    contexts, positions = store.read_mapping("train")
    picks = np.random.default_rng(1).choice(store.n_rows("train"), 10, replace=False)
    tokens = torch.from_numpy(store.tokens[:][contexts[picks]].astype(np.int64))
    raw = run_to_hooks(load_host_model("tiny-random"), tokens, EXPANDED)
    at = (torch.arange(len(picks)), torch.from_numpy(positions[picks].astype(np.int64)))
    for hook in EXPANDED:  # one row index, one token, for every hook
        expected = store.normalization(hook).apply(raw[hook][at])[0].numpy().astype(np.float16)
        np.testing.assert_array_equal(store.read_rows("train", hook)[picks], expected)


def test_a_store_of_d_model_hooks_stays_version_2(tiny_store):
    header = open_store(tiny_store).header  # a file per chunk (collect_args): no shards either
    assert header.schema_version == 2 and "hook_widths" not in header.to_attrs() and header.shard_rows is None


def test_damaged_widths_are_refused(wide_store, tmp_path):
    path = tmp_path / "w.zarr"
    shutil.copytree(wide_store, path)
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"][schema.ATTRS_KEY]["hook_widths"] = {"blocks.1.mlp.hook_post": 64}
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(schema.StoreError, match="attributes disagree with the array train/acts/blocks.1.mlp.hook_post"):
        ActivationStore.open(path)
    root["attributes"][schema.ATTRS_KEY]["hook_widths"] = {"blocks.9.nothing": 12}
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(schema.StoreError, match="'hook_widths' is not a positive width for hooks of the store"):
        ActivationStore.open(path)


def test_a_bad_layer_set_is_one_line(tmp_path):
    expect_error(
        run("collect", *cli_args("blocks.{2-1}.hook_mlp_out", tokens=1000), "--out", tmp_path / "s.zarr"),
        "the layer range 2-1 runs backwards",
    )
    assert not (tmp_path / "s.zarr").exists()
