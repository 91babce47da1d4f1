"""Loading a host model by name: the offline default, the tiny random test model, an HF id or folder."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from stages.basics.defaults import DEFAULT_MODEL
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError, first_line
from stages.host_model.direct import DirectForward
from stages.host_model.model import HostModel, block_hook_points
from stages.host_model.smollm2 import prepare_default_model, read_conversion_marker, sha256_16
from stages.host_model.synthetic import is_synthetic, load_synthetic
from stages.host_model.tokenizers import ByteTokenizer, HFTextTokenizer, TextTokenizer

# transformer_lens, transformers and huggingface_hub are imported inside the functions that boot a model:
# they take seconds to import, which the commands that never load a model (train, compare, ...) should not pay.

TINY_RANDOM_NAME = "tiny-random"


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _parse_dtype(dtype: str) -> tuple[str, torch.dtype]:
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise SaepipeError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    torch_dtype = _DTYPES[key]
    return str(torch_dtype).removeprefix("torch."), torch_dtype


def load_host_model(name: str, device: str = "auto", dtype: str = "float32") -> HostModel:
    """Load ``smollm2-135m``, ``tiny-random``, ``synthetic[-d<N>]``, ``null-d<N>``, an HF model id or a local HF model directory."""
    name = str(name).strip()
    if not name:
        raise SaepipeError("no model named: use --model smollm2-135m, an HF model id or a local model directory")
    torch_device = resolve_device(device)
    dtype_name, torch_dtype = _parse_dtype(dtype)
    if name.lower() == TINY_RANDOM_NAME:
        return _load_tiny_random(torch_device, dtype_name, torch_dtype)
    if name.lower() == DEFAULT_MODEL:
        return _load_smollm2(torch_device, dtype_name, torch_dtype)
    if is_synthetic(name):
        return load_synthetic(name, torch_device, dtype_name)
    return _load_hf_model(name, torch_device, dtype_name, torch_dtype)


def load_tokenizer(name: str) -> TextTokenizer:
    """The tokenizer of a model named as load_host_model takes it, without loading the model's weights:
    what turns a store's token ids back into text."""
    name = str(name).strip()
    if name.lower() == TINY_RANDOM_NAME or is_synthetic(name):
        return ByteTokenizer()
    if name.lower() == DEFAULT_MODEL:
        return _smollm2_tokenizer(prepare_default_model())
    from transformers import AutoTokenizer

    try:
        return HFTextTokenizer(AutoTokenizer.from_pretrained(str(Path(name).expanduser())), name=name)
    except Exception as e:
        raise SaepipeError(
            f"the tokenizer of model '{name}' could not be loaded ({first_line(e)}): pass a local model "
            f"directory, or connect to the internet once so that the HF cache holds it"
        ) from None


def _finish(
    name: str, bridge: Any, tokenizer: TextTokenizer, revision: str, dtype_name: str, device: torch.device
) -> HostModel:
    bridge.eval()
    for param in bridge.original_model.parameters():
        param.requires_grad_(False)
    hf_config = getattr(bridge.original_model, "config", None)
    if hf_config is not None:
        # The bridge boots with output_attentions=True (for its attention-pattern hooks); returning every
        # layer's [batch, heads, ctx, ctx] pattern and a KV cache costs memory and buys us nothing.
        for flag in ("output_attentions", "use_cache"):
            if hasattr(hf_config, flag):
                setattr(hf_config, flag, False)
    n_layers = int(bridge.cfg.n_layers)
    hook_points = block_hook_points(bridge, n_layers)
    model = HostModel(
        name=name,
        bridge=bridge,
        tokenizer=tokenizer,
        d_model=int(bridge.cfg.d_model),
        n_layers=n_layers,
        revision=revision,
        dtype=dtype_name,
        device=device,
        hook_points=hook_points,
        direct=None if _bridge_forced() else DirectForward.build(bridge, hook_points, int(bridge.cfg.d_vocab)),
    )
    if not any(h.endswith(".hook_resid_post") for h in model.hook_points):
        raise SaepipeError(
            f"model '{name}' exposes no blocks.<i>.hook_resid_post hook points: "
            f"its architecture is not supported by transformer_lens' TransformerBridge"
        )
    return model


def _bridge_forced() -> bool:
    """SAEPIPE_FORWARD=bridge: every forward pass through TransformerBridge, even where HF's own modules
    serve the hooks (to compare the two, or to rule the direct path out when something looks wrong)."""
    value = os.environ.get("SAEPIPE_FORWARD", "auto").strip().lower()
    if value not in ("auto", "bridge"):
        raise SaepipeError(f"SAEPIPE_FORWARD={value!r} is not a choice: set it to auto (the default) or bridge")
    return value == "bridge"


def _load_tiny_random(device: torch.device, dtype_name: str, torch_dtype: torch.dtype) -> HostModel:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=64,
        d_head=16,
        n_heads=4,
        n_layers=4,
        n_ctx=256,
        d_vocab=257,
        d_mlp=256,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        model_name=TINY_RANDOM_NAME,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bridge = TransformerBridge.boot_native(cfg, device=device, dtype=torch_dtype, model_name=TINY_RANDOM_NAME)
    return _finish(TINY_RANDOM_NAME, bridge, ByteTokenizer(), "random-seed-0", dtype_name, device)


def _load_smollm2(device: torch.device, dtype_name: str, torch_dtype: torch.dtype) -> HostModel:
    from transformer_lens.model_bridge import TransformerBridge

    target = prepare_default_model()
    marker = read_conversion_marker(target) or {}
    revision = str(marker.get("gguf_sha256_16") or "unknown")
    tokenizer = _smollm2_tokenizer(target)
    bridge = TransformerBridge.boot_transformers(
        str(target), tokenizer=tokenizer.hf_tokenizer, device=device, dtype=torch_dtype
    )
    return _finish(DEFAULT_MODEL, bridge, tokenizer, revision, dtype_name, device)


def _smollm2_tokenizer(target: Path) -> HFTextTokenizer:
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(target))
    tokenizer = HFTextTokenizer(hf_tokenizer, name=DEFAULT_MODEL)
    # The GGUF declares the chat tokens <|im_start|>/<|im_end|> as BOS/EOS; raw text was pretrained with
    # <|endoftext|> (id 0) starting and separating documents, so contexts use that.
    tokenizer.bos_token_id = tokenizer.eos_token_id = int(hf_tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    parts = urlsplit(constants.ENDPOINT)
    host = parts.hostname or "huggingface.co"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _local_dir_revision(path: Path) -> str:
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.gguf"))
    if not weights:
        return (
            "config-" + hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
            if (path / "config.json").is_file()
            else "unknown"
        )
    if len(weights) == 1:
        return sha256_16(weights[0])
    combined = hashlib.sha256("".join(f"{w.name}:{sha256_16(w)}\n" for w in weights).encode())
    return combined.hexdigest()[:16]


def _load_hf_model(name: str, device: torch.device, dtype_name: str, torch_dtype: torch.dtype) -> HostModel:
    path = Path(name).expanduser()
    unreachable = SaepipeError(
        f"model '{name}' could not be loaded (not in the local HF cache and the hub is unreachable): pass a "
        f"local model directory, use --model smollm2-135m, or connect to the internet"
    )
    revision: str | None = None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SaepipeError(
                f"model directory '{name}' has no config.json: pass a folder holding an HF model "
                f"(config.json, weights, tokenizer files), or an HF model id"
            )
        source, local = str(path), True
    elif name.startswith(("/", "./", "../", "~")) or path.suffix in (".gguf", ".safetensors"):
        raise SaepipeError(
            f"model directory '{name}' does not exist: pass a folder holding an HF model "
            f"(config.json, weights, tokenizer files), or an HF model id"
        )
    else:
        local = False
        try:
            from huggingface_hub import snapshot_download

            source = snapshot_download(name, local_files_only=True)  # a cached copy: no network at all
            revision = Path(source).name
        except Exception as e:
            if type(e).__name__ == "HFValidationError":
                raise SaepipeError(
                    f"model '{name}' is not smollm2-135m, tiny-random, a local directory or a valid "
                    f"HF model id (like gpt2 or EleutherAI/pythia-70m)"
                ) from e
            if not _hub_reachable():
                raise unreachable from e
            source = name  # the hub is up: transformers downloads what it needs
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer = HFTextTokenizer(hf_tokenizer, name=name)
        bridge = TransformerBridge.boot_transformers(source, tokenizer=hf_tokenizer, device=device, dtype=torch_dtype)
    except SaepipeError:
        raise
    except Exception as e:
        if local:
            raise SaepipeError(
                f"model directory '{name}' could not be loaded ({first_line(e)}): it must hold an "
                f"HF causal LM that transformer_lens supports"
            ) from e
        if source == name and not _hub_reachable():
            raise unreachable from e
        raise SaepipeError(
            f"model '{name}' could not be loaded ({first_line(e)}): check the name, or pass a "
            f"local model directory or --model smollm2-135m"
        ) from e
    if revision is None:
        commit = getattr(getattr(bridge.original_model, "config", None), "_commit_hash", None)
        if commit:
            revision = str(commit)
        elif local:
            revision = _local_dir_revision(path)
        else:
            config = bridge.original_model.config.to_json_string(use_diff=False)
            revision = "config-" + hashlib.sha256(config.encode()).hexdigest()[:16]
    return _finish(name, bridge, tokenizer, revision, dtype_name, device)
