"""HF's own forward pass (stages.host_model.direct) against TransformerBridge's, on tiny random GPT-2 and
Llama models saved as local HF folders: the same rows within fp16 rounding at every hook, the same logits
with an activation replaced, the bridge's weights shared rather than copied, and the bridge taking over
wherever the direct path cannot serve a hook."""

import pytest
import torch

from stages.basics.errors import SaepipeError
from stages.host_model.direct import _agreeing_hooks
from stages.host_model.loading import load_host_model
from stages.host_model.model import (
    INNER_HOOKS,
    logits_with_hook_replaced,
    logits_with_hooks_predicted,
    run_to_hooks,
)
from tests.helpers.tolerance import FP16_ROUNDING, assert_within_fp16_rounding


def load_both(path, monkeypatch):
    """The model loaded twice: with the direct path (the default) and with the bridge forced."""
    direct = load_host_model(str(path), device="cpu")
    monkeypatch.setenv("SAEPIPE_FORWARD", "bridge")
    bridge = load_host_model(str(path), device="cpu")
    monkeypatch.delenv("SAEPIPE_FORWARD")
    return direct, bridge


@pytest.fixture(params=["tiny_gpt2_dir", "tiny_llama_dir"])
def models(request, monkeypatch):
    path, _ = request.getfixturevalue(request.param)
    return load_both(path, monkeypatch)


@pytest.fixture
def tokens() -> torch.Tensor:
    toks = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(3))
    toks[:, 0] = 256
    return toks


def test_every_hook_is_served_by_hf_with_the_bridges_rows(models, tokens):
    direct, bridge = models
    hooks = direct.hook_names()
    assert direct.direct is not None and sorted(direct.direct.taps) == sorted(hooks)
    assert direct.forward_path(hooks) == "hf-sdpa" and bridge.forward_path(hooks) == "transformer-bridge"
    assert any(hook.endswith(INNER_HOOKS) for hook in hooks)  # attn.hook_z, mlp.hook_in, mlp.hook_post too
    ours, theirs = run_to_hooks(direct, tokens, hooks), run_to_hooks(bridge, tokens, hooks)
    for hook in hooks:
        assert ours[hook].shape == (3, 20, direct.hook_width(hook))
        assert_within_fp16_rounding(ours[hook], theirs[hook])


def test_the_direct_model_shares_the_bridges_weights(models):
    direct, _ = models
    wrapped = {t.data_ptr() for t in direct.bridge.original_model.parameters()}
    plain = list(direct.direct.model.parameters())
    assert plain and all(t.data_ptr() in wrapped for t in plain)
    assert direct.direct.model.config._attn_implementation == "sdpa"


def test_splices_give_the_bridges_logits(models, tokens):
    direct, bridge = models
    hook = "blocks.1.hook_resid_post"
    plain = [logits_with_hook_replaced(m, tokens, hook, None) for m in (direct, bridge)]
    assert_within_fp16_rounding(*plain)

    def halve(x):
        return x * 0.5

    spliced = [logits_with_hook_replaced(m, tokens, hook, halve) for m in (direct, bridge)]
    assert_within_fp16_rounding(*spliced)
    assert (spliced[0] - plain[0]).abs().max() > 100 * FP16_ROUNDING * plain[0].abs().max()  # it took effect

    def predict(i, x, y):  # a stand-in transcoder per MLP: its input, scaled, for its output
        return 0.1 * (i + 1) * x

    pairs = [(f"blocks.{i}.mlp.hook_in", f"blocks.{i}.hook_mlp_out") for i in range(2)]
    predicted = [logits_with_hooks_predicted(m, tokens, pairs, predict) for m in (direct, bridge)]
    assert_within_fp16_rounding(*predicted)


def test_an_input_side_hook_is_replaced_on_the_direct_path(tiny_llama_dir, monkeypatch, tokens):
    direct, bridge = load_both(tiny_llama_dir[0], monkeypatch)
    for hook in ("blocks.2.hook_resid_pre", "blocks.1.mlp.hook_post", "blocks.1.attn.hook_z"):
        got = [logits_with_hook_replaced(m, tokens, hook, torch.zeros_like) for m in (direct, bridge)]
        assert_within_fp16_rounding(*got)


def test_a_hook_the_direct_path_does_not_serve_sends_the_whole_pass_to_the_bridge(tiny_gpt2_dir, monkeypatch, tokens):
    direct, bridge = load_both(tiny_gpt2_dir[0], monkeypatch)
    del direct.direct.taps["blocks.2.hook_mlp_out"]
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    assert direct.forward_path(hooks) == "transformer-bridge"
    assert direct.forward_path(hooks[:1]) == "hf-sdpa"
    ours, theirs = run_to_hooks(direct, tokens, hooks), run_to_hooks(bridge, tokens, hooks)
    for hook in hooks:
        assert torch.equal(ours[hook], theirs[hook])  # the same forward pass, to the bit


def test_a_model_whose_hf_forward_cannot_run_is_served_by_the_bridge(tiny_gpt2_dir, monkeypatch, capsys, tokens):
    from stages.host_model import direct as direct_module

    def broken(self, tokens, logits):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(direct_module.DirectForward, "run", broken)
    model = load_host_model(str(tiny_gpt2_dir[0]), device="cpu")
    assert model.direct is None and "passes that read them run through the bridge" in capsys.readouterr().err
    assert run_to_hooks(model, tokens, ["blocks.2.hook_resid_post"])["blocks.2.hook_resid_post"].shape == (3, 20, 32)


def test_the_check_drops_hooks_where_hf_and_the_bridge_disagree(tiny_llama_dir, monkeypatch):
    direct, _ = load_both(tiny_llama_dir[0], monkeypatch)
    # A change to layer 1's attention output on the direct side only: every hook from there on differs.
    handle = direct.direct.model.model.layers[1].self_attn.register_forward_hook(
        lambda module, args, output: (output[0] * 1.01, *output[1:])
    )
    try:
        kept = _agreeing_hooks(direct.direct, direct.bridge, direct.hook_points, direct.d_vocab)
    finally:
        handle.remove()
    layer1 = [f"blocks.1.{s}" for s in ("hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")]
    assert "blocks.0.hook_resid_post" in kept and "blocks.1.hook_resid_pre" in kept
    assert not any(hook in kept for hook in layer1) and not any(hook.startswith("blocks.2.") for hook in kept)


def test_the_native_tiny_model_has_no_direct_path():
    model = load_host_model("tiny-random", device="cpu")
    assert model.direct is None and model.forward_path(model.hook_names()) == "transformer-bridge"


def test_an_unknown_forward_setting_is_refused(tiny_gpt2_dir, monkeypatch):
    monkeypatch.setenv("SAEPIPE_FORWARD", "fast")
    with pytest.raises(SaepipeError, match="SAEPIPE_FORWARD='fast' is not a choice"):
        load_host_model(str(tiny_gpt2_dir[0]), device="cpu")


def test_a_store_from_the_direct_path_holds_the_bridges_rows(tiny_llama_dir, tmp_path, monkeypatch):
    from stages.collect import run_collect
    from stages.collect.config import CollectConfig
    from store_schema.reader import open_store
    from tests.helpers.collect import SETTINGS

    hooks = ("blocks.1.hook_resid_post", "blocks.2.mlp.hook_in")
    settings = dict(SETTINGS, model=str(tiny_llama_dir[0]), hooks=hooks, tokens=1500)
    run_collect(CollectConfig(out=str(tmp_path / "hf.zarr"), **settings))
    monkeypatch.setenv("SAEPIPE_FORWARD", "bridge")
    run_collect(CollectConfig(out=str(tmp_path / "bridge.zarr"), **settings))
    ours, theirs = open_store(tmp_path / "hf.zarr"), open_store(tmp_path / "bridge.zarr")
    assert (ours.header.model.forward, theirs.header.model.forward) == ("hf-sdpa", "transformer-bridge")
    for hook in hooks:
        a = torch.from_numpy(ours.read_rows("train", hook).astype("float32"))
        b = torch.from_numpy(theirs.read_rows("train", hook).astype("float32"))
        # each side's rows normalized by its own statistics, then rounded to fp16: two roundings apart at most
        assert_within_fp16_rounding(a, b, roundings=2, what=hook)
