"""The real offline default (SmolLM2-135M on python-docs) end to end on a small budget."""

import json

import numpy as np
import pytest
import torch

from store_schema.reader import open_store
from tests.helpers.cli import run_ok

pytestmark = pytest.mark.slow
HOOK = "blocks.15.hook_resid_post"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    store, out = root / "s.zarr", root / "run"
    run_ok(
        "collect",
        "--tokens",
        "6000",
        "--context-size",
        "64",
        "--eval-fraction",
        "0.1",
        "--out",
        str(store),
        "--no-progress",
    )
    run_ok(
        "train",
        str(store),
        "--width",
        "512",
        "--k",
        "16",
        "--tokens",
        "60000",
        "--batch-size",
        "1024",
        "--out",
        str(out),
        "--no-progress",
    )
    run_ok("eval", str(out), "--tokens", "640", "--no-progress")
    return store, out


def test_store_of_the_default_model(trained):
    store = open_store(trained[0])
    h = store.header
    assert h.model.name == "smollm2-135m" and h.d_model == 576 and h.model.n_layers == 30
    assert h.hooks == (HOOK,) and h.dropped_positions == (0,)
    assert h.text_source["name"] == "python-docs"
    stats = store.running_stats("train", HOOK)
    # center-scale makes E‖x̂‖ = √d; without position 0 there are no attention-sink outliers left
    assert 0.8 * 576 < stats.mean_sq_norm < 1.5 * 576
    assert stats.max_abs < 200 and stats.nonfinite_values == 0
    assert (store.tokens[:, 0] == store.header.tokenizer.bos_token_id).all()


def test_eval_of_the_default_model(trained):
    metrics = json.loads((trained[1] / "eval.json").read_text())
    assert metrics["model"] == "smollm2-135m" and metrics["downstream_tokens"] > 0
    assert 0.3 < metrics["fve"] < 1 and metrics["l0"] <= 16
    # SmolLM2 predicts Python documentation well; zero-ablating a middle layer ruins it
    assert 1.0 < metrics["ce_clean"] < 4.0
    assert metrics["ce_zero"] > metrics["ce_clean"] + 1.0
    assert metrics["ce_clean"] <= metrics["ce_sae"] < metrics["ce_zero"]
    assert 0 < metrics["ce_recovered"] <= 1 and metrics["kl"] > 0


def test_saelens_export_matches_on_real_raw_activations(trained):
    sae_lens = pytest.importorskip("sae_lens")
    from stages.evaluate import run_normalization
    from stages.host_model.loading import load_host_model
    from stages.host_model.model import run_to_hooks
    from stages.saes.saved import load_sae

    store, out = trained
    ours, cfg = load_sae(out)
    theirs = sae_lens.SAE.load_from_disk(str(out / "saelens"))
    norm = run_normalization(cfg)
    contexts = open_store(store).contexts("eval")[:2]
    tokens = torch.from_numpy(open_store(store).tokens.oindex[contexts.tolist(), :].astype(np.int64))
    raw = run_to_hooks(load_host_model("smollm2-135m"), tokens, [HOOK])[HOOK][:, 1:].reshape(-1, 576).clone()
    with torch.no_grad():
        code = ours.encode(norm.apply(raw)[0])
        expected = norm.invert(ours.decode(code))
        got_latents = theirs.encode(raw)
        got = theirs.decode(got_latents)
    torch.testing.assert_close(got_latents, code.dense(ours.d_sae), rtol=1e-4, atol=1e-4 * float(code.values.max()))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_hf_forward_gives_the_bridges_rows_and_logits_on_the_default_model(trained, monkeypatch):
    """The default model's collect and eval run through HF's own modules (SDPA attention): at every kind
    of hook, and with an activation replaced, what they give is the bridge's within fp16 rounding."""
    from stages.host_model.loading import load_host_model
    from stages.host_model.model import logits_with_hook_replaced, run_to_hooks
    from tests.helpers.tolerance import FP16_ROUNDING, assert_within_fp16_rounding

    store = open_store(trained[0])
    assert store.header.model.forward == "hf-sdpa"
    tokens = torch.from_numpy(store.tokens[:2].astype(np.int64))
    hooks = [f"blocks.{layer}.{suffix}" for layer in (0, 15, 29) for suffix in (
        "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
        "attn.hook_z", "mlp.hook_in", "mlp.hook_post",
    )]  # fmt: skip
    direct = load_host_model("smollm2-135m")
    assert direct.forward_path(hooks) == "hf-sdpa"
    ours = run_to_hooks(direct, tokens, hooks)
    replaced = logits_with_hook_replaced(direct, tokens, HOOK, lambda x: 0.5 * x)
    del direct
    monkeypatch.setenv("SAEPIPE_FORWARD", "bridge")
    bridge = load_host_model("smollm2-135m")
    theirs = run_to_hooks(bridge, tokens, hooks)
    for hook in hooks:
        a, b = ours[hook][:, 1:], theirs[hook][:, 1:]  # position 0, the attention sink, is never stored
        assert_within_fp16_rounding(a, b, what=hook)
    expected = logits_with_hook_replaced(bridge, tokens, HOOK, lambda x: 0.5 * x)
    assert float((replaced - expected).abs().max()) <= FP16_ROUNDING * float(expected.abs().max())
