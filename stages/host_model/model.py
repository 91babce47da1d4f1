"""A loaded host model and what runs on it: hook names, the forward pass that stops at the deepest
hook, and the full forward with one hook's activation replaced (eval's splice)."""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from stages.basics.errors import SaepipeError
from stages.host_model.direct import DirectForward
from stages.host_model.tokenizers import TextTokenizer

# transformer_lens is imported where a forward pass needs it: it takes seconds to import (see loading.py).

# The per-block hook points a user may pass, in the order they fire inside a block. Each one carries a
# [batch, ctx, d_model] tensor. Architectures without one of them (parallel attention+MLP blocks have no
# resid_mid) simply do not list it.
BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
# Hook points inside a block's attention and MLP, under their TransformerBridge names, for transcoders and
# SAEs on MLP neurons or attention heads:
# - attn.hook_z: attention's per-head outputs before the output projection, [batch, ctx, heads, d_head],
#   stored flattened over heads (n_heads * d_head wide, head-major), as attention-output SAEs read it;
# - mlp.hook_in: the MLP's input after its norm (ln2's output), d_model wide: a transcoder's input;
# - mlp.hook_post: the MLP's hidden activations after the nonlinearity, d_mlp wide.
INNER_HOOKS = ("attn.hook_z", "mlp.hook_in", "mlp.hook_post")


_HOOK_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


# Hook levels we hand to HookPoint.add_hook, far above the bridge's own context levels, so removing ours
# never touches a hook somebody else added.
_hook_levels = itertools.count(1_000_000)


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
    # HF's own forward pass over the same weights, for the hooks it serves (None: the bridge serves all).
    direct: DirectForward | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.hook_points and hasattr(self.bridge, "hook_dict"):
            self.hook_points = block_hook_points(self.bridge, self.n_layers)

    def hook_names(self) -> list[str]:
        """Every hook name a user may pass, in forward order: blocks.{i}.hook_{resid_pre,attn_out,...}."""
        return list(self.hook_points)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    def direct_for(self, hooks) -> DirectForward | None:
        """HF's own forward pass when it serves every one of these hooks, else None (the bridge's)."""
        return self.direct if self.direct is not None and self.direct.covers(hooks) else None

    def forward_path(self, hooks) -> str:
        """Which forward pass serves these hooks: "hf-<attention>" (HF's own modules, e.g. hf-sdpa) where
        they all read what HF's modules expose, else the bridge's ("transformer-bridge", or a stand-in's
        own name). What a store's header records."""
        direct = self.direct_for(hooks)
        if direct is not None:
            return f"hf-{direct.attention}"
        return getattr(self.bridge, "forward_name", "transformer-bridge")

    def hook_width(self, hook: str) -> int:
        """The width of a hook's rows as collect stores them (attn.hook_z flattened over heads)."""
        suffix = hook_suffix(hook)
        cfg = getattr(self.bridge, "cfg", None)
        if suffix == "mlp.hook_post":
            return int(cfg.d_mlp)
        if suffix == "attn.hook_z":
            return int(cfg.n_heads) * int(cfg.d_head)
        return self.d_model

    @property
    def n_ctx(self) -> int:
        """The model's context length (learned-position models cannot go beyond it)."""
        return int(self.bridge.cfg.n_ctx)


def block_hook_points(bridge: Any, n_layers: int) -> dict[str, Any]:
    """Resolve blocks.{i}.<BLOCK_HOOKS and INNER_HOOKS> through the bridge's alias table to the HookPoints
    that fire."""
    available = bridge.hook_dict  # canonical names + TL-style aliases -> HookPoint
    points: dict[str, Any] = {}
    for layer in range(n_layers):
        for suffix in BLOCK_HOOKS + INNER_HOOKS:
            name = f"blocks.{layer}.{suffix}"
            if name in available:
                points[name] = available[name]
    return points


_LAYER_SET_RE = re.compile(r"\{([^{}]*)\}")


def expand_hook_ranges(patterns) -> list[str]:
    """Hook names with layer sets written out: ``blocks.{0-29}.hook_mlp_out`` is 30 names,
    ``blocks.{0,4,8-9}.mlp.hook_in`` four; names without braces pass as they are (order kept)."""
    names: list[str] = []
    for pattern in patterns:
        match = _LAYER_SET_RE.search(pattern)
        if match is None:
            names.append(pattern)
            continue
        layers: list[int] = []
        for part in match.group(1).split(","):
            bounds = part.strip().split("-")
            if not (1 <= len(bounds) <= 2 and all(b.strip().isdigit() for b in bounds)):
                raise SaepipeError(
                    f"--hook {pattern}: '{{{match.group(1)}}}' is not a layer set; write e.g. "
                    f"blocks.{{0-29}}.hook_mlp_out or blocks.{{0,4,8-11}}.mlp.hook_in"
                )
            first, last = int(bounds[0]), int(bounds[-1])
            if last < first:
                raise SaepipeError(
                    f"--hook {pattern}: the layer range {first}-{last} runs backwards; write {last}-{first}"
                )
            layers.extend(range(first, last + 1))
        head, tail = pattern[: match.start()], pattern[match.end() :]
        names.extend(expand_hook_ranges([f"{head}{layer}{tail}" for layer in layers]))
    return names


def hook_suffix(hook: str) -> str:
    """What follows ``blocks.{i}.`` in a hook name (the whole name when it has no layer)."""
    match = _HOOK_LAYER_RE.match(hook)
    return hook if match is None else hook[match.end() :]


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


class _Pass:
    """One forward pass with callbacks at hook points, through HF's own modules when those serve every
    hook involved (stages.host_model.direct), else through the bridge; the callbacks go when it ends."""

    def __init__(self, model: HostModel, hooks: list[str]):
        self.model = model
        self.direct = model.direct_for(hooks)
        self.level = next(_hook_levels)
        self.removers: list[Callable[[], None]] = []

    def attach(self, hook: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """fn(activation) when `hook` fires; a tensor it returns replaces the activation."""
        if self.direct is not None:
            self.removers.append(self.direct.taps[hook].attach(fn))
            return
        point, level = self.model.hook_points[hook], self.level
        point.add_hook(lambda tensor, *, hook: fn(tensor), level=level)
        self.removers.append(lambda: point.remove_hooks("fwd", level=level))

    def stop(self, tensor: torch.Tensor) -> BaseException:
        """What a callback raises once the pass has given everything it was run for."""
        return self.direct.stop() if self.direct is not None else _stop_at_layer_exception()(tensor)

    def run(self, tokens: torch.Tensor, logits: bool, stop_at_layer: int | None = None) -> torch.Tensor | None:
        """The pass (float32 logits when asked for); the callbacks are detached after it, whatever happens."""
        try:
            with torch.inference_mode():
                if self.direct is not None:
                    out = self.direct.run(tokens, logits)
                else:
                    stop_exc = _stop_at_layer_exception()
                    try:
                        out = self.model.bridge.forward(
                            tokens, return_type="logits" if logits else None, stop_at_layer=stop_at_layer
                        )
                    except stop_exc:
                        out = None  # bridge.forward catches its own; this covers a stop raised outside its try
        finally:
            for remove in self.removers:
                remove()
        return out.float() if logits else None


def run_to_hooks(
    model: HostModel, tokens: torch.Tensor, hooks: list[str], buffers: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One forward pass that stops as soon as every requested hook has fired.

    Returns {hook: float32 [batch, ctx, model.hook_width(hook)]} on the model's device. Layers after the deepest
    requested one never run (a stop raised from the last hook to fire, which also spares the rest of that
    block and the unembedding; on the bridge, its stop_at_layer besides).

    `buffers`: where to capture, kept by the caller from call to call (a collect's batches): each hook's is
    made, or made larger, as needed, and the tensors returned are views of them, valid until the next call.
    A batch's activations are tens of MB: a fresh tensor each time is fresh pages from the kernel, whose
    faults cost collect more than the copy itself on a CPU.
    """
    hooks = validate_hooks(model, hooks)
    tokens = _prepare_tokens(model, tokens)
    deepest = max(hook_layer(h) for h in hooks)
    stop_at_layer = deepest + 1 if deepest + 1 < model.n_layers else None
    forward = _Pass(model, hooks)

    by_point: dict[int, list[str]] = {}  # aliases of one hook point are captured once
    for hook in hooks:
        by_point.setdefault(id(model.hook_points[hook]), []).append(hook)
    captured: dict[str, torch.Tensor] = {}

    def capturing(names: list[str]) -> Callable[[torch.Tensor], None]:
        expected = (tokens.shape[0], tokens.shape[1], model.hook_width(names[0]))

        def capture(tensor: torch.Tensor) -> None:
            tensor = _as_rows(tensor)
            if tuple(tensor.shape) != expected:
                raise RuntimeError(f"hook {names[0]} gave shape {tuple(tensor.shape)}, expected {expected}")
            if buffers is None:
                value = tensor.detach().to(torch.float32, copy=True)
            else:
                value = _capture_buffer(buffers, names[0], expected, tensor.device).copy_(tensor.detach())
            for name in names:
                captured[name] = value
            if len(captured) == len(hooks):
                raise forward.stop(tensor)  # everything is in hand: the rest of the forward pass is waste
            return None

        return capture

    for names in by_point.values():
        forward.attach(names[0], capturing(names))
    forward.run(tokens, logits=False, stop_at_layer=stop_at_layer)
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire during the forward pass of {model.name}")
    return {h: captured[h] for h in hooks}


def _capture_buffer(
    buffers: dict[str, torch.Tensor], hook: str, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """A float32 view of `shape` on the front of `hook`'s buffer (made, or made larger, first)."""
    size = math.prod(shape)
    buffer = buffers.get(hook)
    if buffer is None or buffer.numel() < size or buffer.device != device:
        buffer = buffers[hook] = torch.empty(size, dtype=torch.float32, device=device)
    return buffer[:size].view(shape)


def logits_with_hook_replaced(
    model: HostModel, tokens: torch.Tensor, hook: str, replace: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Full forward pass; with ``replace``, the hook's activation x [batch, ctx, d] becomes replace(x).

    Returns float32 logits [batch, ctx, vocab] on the model's device. It runs through the same forward
    pass as run_to_hooks (so as collect) for that hook.
    """
    validate_hooks(model, [hook])
    tokens = _prepare_tokens(model, tokens)
    forward = _Pass(model, [hook])
    if replace is not None:
        forward.attach(hook, lambda tensor: _put_back(replace(_as_rows(tensor)), tensor, f"replacement for {hook}"))
    return forward.run(tokens, logits=True)


def logits_with_hook_predicted(
    model: HostModel,
    tokens: torch.Tensor,
    read_hook: str,
    hook: str,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Full forward pass in which `hook`'s activation y [batch, ctx, d] becomes predict(x, y), x being what
    `read_hook` (which fires earlier in the same pass) carried: a transcoder's output spliced in for an
    MLP's. Returns float32 logits [batch, ctx, vocab]."""
    return logits_with_hooks_predicted(model, tokens, [(read_hook, hook)], lambda _, x, y: predict(x, y))


def logits_with_hooks_predicted(
    model: HostModel,
    tokens: torch.Tensor,
    pairs: list[tuple[str, str]],
    predict: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Full forward pass in which, for each (read hook, hook) of `pairs`, in the order they fire, the hook's
    activation y becomes predict(i, x, y), x being what pair i's read hook carried earlier in the same pass
    (after the earlier pairs' predictions took effect): per-layer transcoders, or a cross-layer transcoder,
    spliced in for every MLP at once. Returns float32 logits [batch, ctx, vocab]."""
    hooks = validate_hooks(model, [hook for pair in pairs for hook in pair])
    tokens = _prepare_tokens(model, tokens)
    forward = _Pass(model, hooks)
    seen: dict[int, torch.Tensor] = {}

    def capturing(i: int) -> Callable[[torch.Tensor], None]:
        def capture(tensor: torch.Tensor) -> None:
            seen[i] = _as_rows(tensor).detach()

        return capture

    def substituting(i: int, read_hook: str, hook: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def substitute(tensor: torch.Tensor) -> torch.Tensor:
            if i not in seen:
                raise SaepipeError(
                    f"{read_hook} fires after {hook} in {model.name}: a prediction reads an earlier hook"
                )
            return _put_back(predict(i, seen.pop(i), _as_rows(tensor)), tensor, f"prediction for {hook}")

        return substitute

    for i, (read_hook, hook) in enumerate(pairs):
        forward.attach(read_hook, capturing(i))
        forward.attach(hook, substituting(i, read_hook, hook))
    return forward.run(tokens, logits=True)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A hook's activation as collect stores it: attn.hook_z's [batch, ctx, heads, d_head] with the heads
    side by side, [batch, ctx, heads * d_head]; every other hook as it is."""
    return tensor.flatten(2) if tensor.ndim == 4 else tensor


def _put_back(new, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`new` rows (shaped as _as_rows(tensor)) in the hook's own shape, dtype and device."""
    rows_shape = _as_rows(tensor).shape
    if not isinstance(new, torch.Tensor) or new.shape != rows_shape:
        raise ValueError(f"{what} must keep shape {tuple(rows_shape)}, got {getattr(new, 'shape', type(new))}")
    return new.reshape(tensor.shape).to(device=tensor.device, dtype=tensor.dtype)
