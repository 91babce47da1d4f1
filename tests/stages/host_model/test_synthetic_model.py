"""The synthetic host model and text (for measuring collect at scale): activations are a deterministic
function of token and position only, fired through the same hook points and forward as a real model,
and a collect with them writes the same store twice."""

import itertools

import numpy as np
import pytest
import torch

from stages.basics.errors import SaepipeError
from stages.host_model.loading import load_host_model
from stages.host_model.model import logits_with_hook_replaced, run_to_hooks
from stages.text.sources import open_text_source
from store_schema.reader import open_store
from tests.helpers.cli import run_ok


def test_activations_depend_on_token_and_position_only():
    model = load_host_model("synthetic-d8", device="cpu")
    assert (model.d_model, model.n_layers) == (8, 4)
    tokens = torch.tensor([[256, 5, 7, 9], [256, 5, 8, 9], [256, 9, 7, 5]])
    acts = run_to_hooks(model, tokens, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"])
    resid = acts["blocks.1.hook_resid_post"]
    assert resid.shape == (3, 4, 8)
    assert torch.equal(resid[0, :2], resid[1, :2]) and torch.equal(resid[0, 3], resid[1, 3])  # same token, place
    assert not torch.equal(resid[0, 1], resid[2, 3])  # token 5 elsewhere: another row
    assert not torch.equal(resid[0], acts["blocks.0.hook_mlp_out"][0])  # each hook its own map
    again = run_to_hooks(load_host_model("synthetic-d8", device="cpu"), tokens, ["blocks.1.hook_resid_post"])
    assert torch.equal(again["blocks.1.hook_resid_post"], resid)


def test_it_has_no_logits_and_says_so():
    model = load_host_model("synthetic", device="cpu")
    assert model.d_model == 32
    with pytest.raises(SaepipeError, match="no logits"):
        logits_with_hook_replaced(model, torch.tensor([[256, 1]]), "blocks.0.hook_resid_post", None)
    with pytest.raises(SaepipeError, match="out of range"):
        load_host_model("synthetic-d0", device="cpu")


def test_synthetic_text_is_endless_and_deterministic():
    first = list(itertools.islice(open_text_source("synthetic-text").documents(), 50))
    again = list(itertools.islice(open_text_source("synthetic-text").documents(), 50))
    assert first == again and len(set(first)) == 50
    assert all(doc.isascii() and len(doc) == 16_384 and " " in doc for doc in first)


def test_collect_with_them_is_repeatable(tmp_path):
    args = ["collect", "--model", "synthetic-d16", "--dataset", "synthetic-text", "--hook",
            "blocks.2.hook_resid_post", "--tokens", "30000", "--warmup-rows", "2000", "--no-progress"]  # fmt: skip
    run_ok(*args, "--out", tmp_path / "a.zarr")
    run_ok(*args, "--out", tmp_path / "b.zarr")
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    assert a.complete and a.n_rows("train") >= 30_000 and a.d_model == 16
    hook = "blocks.2.hook_resid_post"
    assert np.array_equal(a.read_rows("train", hook), b.read_rows("train", hook))
    assert a.header.model.name == "synthetic-d16" and a.header.text_source["kind"] == "synthetic"


def test_the_null_model_fires_the_same_rows_for_every_context_and_stores_them(tmp_path):
    """null-d<N> costs no work per token: each position's row is fixed, whatever the token. A collect with
    it goes through the same path as a real model and stores those rows, normalized."""
    model = load_host_model("null-d8", device="cpu")
    tokens = torch.tensor([[256, 5, 7], [256, 9, 1]])
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    acts = run_to_hooks(model, tokens, hooks)
    assert acts[hooks[0]].shape == (2, 3, 8) and torch.equal(acts[hooks[0]][0], acts[hooks[0]][1])
    assert not torch.equal(acts[hooks[0]][0, 1], acts[hooks[0]][0, 2])  # one row per position
    assert model.forward_path(hooks) == "null"
    with pytest.raises(SaepipeError, match="needs its width"):
        load_host_model("null", device="cpu")

    run_ok("collect", "--model", "null-d16", "--dataset", "synthetic-text", "--hook", "blocks.1.hook_resid_post",
           "--tokens", "20000", "--context-size", "64", "--no-progress", "--out", tmp_path / "n.zarr")  # fmt: skip
    store = open_store(tmp_path / "n.zarr")
    assert store.complete and store.n_rows("train") >= 20_000 and store.header.model.name == "null-d16"
    rows = store.read_rows("train", "blocks.1.hook_resid_post").astype(np.float32)
    assert np.isfinite(rows).all() and len(np.unique(rows, axis=0)) <= 63  # at most one row per stored position
