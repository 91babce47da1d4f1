"""The HF model run directly: its own modules and PyTorch's SDPA attention, read through module hooks.

TransformerBridge wraps every HF module in place (so that TransformerLens-style hooks fire), and its
attention is reimplemented step by step so that the attention-pattern hooks can fire too. Where the
hooks asked for are ones HF's own modules expose (a block's input and output, its attention and MLP
outputs, the MLP's input, ...), the same numbers come from HF's own forward pass, which is the fastest
correct one (on a GPU, the bridge's hundreds of Python hook calls per forward weigh).

`DirectForward.build` makes a second, plain module tree of the same HF class whose parameters and
buffers *are* the bridge's tensors (no copy: no second model in memory), and learns from the bridge
which HF module each hook point wraps: a hook point named `<component>.hook_in` reads that module's
input, `<component>.hook_out` its output. It then checks every hook on a few random tokens against
the bridge and keeps only those that agree within fp16 rounding: a store's rows and its evaluation
agree whichever path runs.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ORIGINAL = "._original_component"
# What the check of each hook allows, relative to its row's largest value: fp16's rounding (2^-11) in
# float32; a few units of the precision for a model run in bfloat16 or float16.
_FP32_TOLERANCE = 2.0**-10
_CHECK_SHAPE = (2, 12)  # contexts x tokens of the check, run once per model load
_CHECK_LEVEL = 999_999  # the check's hook level on the bridge: below model.py's, so it touches no other


class _AllCaptured(Exception):
    """Raised from the last capture of a forward pass: the rest of the pass is waste."""


@dataclass(frozen=True)
class Tap:
    """Where a hook's activation is on the plain model: a module's first input, or its (first) output."""

    module: torch.nn.Module
    reads_input: bool

    def attach(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[], None]:
        """Call fn(activation) when the module runs; a tensor it returns replaces the activation. Returns
        the function that detaches it."""
        if self.reads_input:

            def pre_hook(module, args, kwargs):
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handle = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def hook(module, args, output):
                if isinstance(output, torch.Tensor):
                    return fn(output)
                new = fn(output[0])
                return None if new is None else (new, *output[1:])

            handle = self.module.register_forward_hook(hook)
        return handle.remove


@dataclass
class DirectForward:
    """HF's own forward pass over the bridge's weights, and the hooks it can read (`taps`)."""

    model: torch.nn.Module
    taps: dict[str, Tap]
    attention: str

    def covers(self, hooks) -> bool:
        return all(hook in self.taps for hook in hooks)

    def run(self, tokens: torch.Tensor, logits: bool) -> torch.Tensor | None:
        """The forward pass (hooks attached by the caller); float logits when asked for, else None, stopped
        by the last capture of run_to_hooks raising stop()."""
        try:
            out = self.model(input_ids=tokens, use_cache=False)
        except _AllCaptured:
            return None
        return out.logits if logits else None

    @staticmethod
    def stop() -> BaseException:
        return _AllCaptured()

    @classmethod
    def build(cls, bridge: Any, hook_points: dict[str, Any], d_vocab: int) -> DirectForward | None:
        """The direct path of a bridge over an HF model, with the hooks that agree with the bridge's; None
        when the model is not an HF one (the tiny native test model) or none of its hooks agree."""
        wrapped = getattr(bridge, "original_model", None)
        plain = _plain_twin(wrapped)
        if plain is None:
            return None
        where = {id(module): name for name, module in wrapped.named_modules()}
        owners = {id(p): module for module in plain.modules() for p in module.parameters(recurse=False)}
        taps = {}
        for hook, point in hook_points.items():
            tap = _tap_of(plain, wrapped, owners, where.get(id(point)))
            if tap is not None:
                taps[hook] = tap
        direct = cls(plain, taps, plain.config._attn_implementation)
        agreeing = _agreeing_hooks(direct, bridge, hook_points, d_vocab)
        if len(agreeing) < len(taps):
            print(
                f"note: {len(taps) - len(agreeing)} of {len(taps)} hooks differ between HF's own forward pass and "
                f"TransformerBridge's by more than fp16 rounding (or HF's could not run); passes that read them "
                f"run through the bridge",
                file=sys.stderr,
            )
        direct.taps = {hook: taps[hook] for hook in agreeing}
        return direct if direct.taps else None


def _plain_twin(wrapped: Any) -> torch.nn.Module | None:
    """An unwrapped instance of the bridge's HF model class, built on the meta device, whose every parameter
    and buffer is then the bridge's own tensor; None where that cannot be done."""
    config = getattr(wrapped, "config", None)
    if config is None or not hasattr(type(wrapped), "_from_config"):
        return None
    config = copy.deepcopy(config)
    for flag in ("output_attentions", "output_hidden_states", "use_cache"):
        if hasattr(config, flag):
            setattr(config, flag, False)
    try:  # on the meta device: no memory, no initialization; every tensor is replaced by the bridge's below
        with torch.device("meta"):
            plain = type(wrapped)._from_config(config, attn_implementation="sdpa")
    except Exception:  # an architecture without SDPA support, or one transformers cannot build from a config
        return None
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in [
        *wrapped.named_parameters(remove_duplicate=False),
        *wrapped.named_buffers(remove_duplicate=False),
    ]:
        tensors[name.replace(ORIGINAL, "")] = tensor
    for kind, named in (("_parameters", plain.named_parameters), ("_buffers", plain.named_buffers)):
        for name, tensor in list(named(remove_duplicate=False)):
            source = tensors.get(name)
            if source is None or source.shape != tensor.shape:
                return None
            module_name, _, leaf = name.rpartition(".")
            getattr(plain.get_submodule(module_name), kind)[leaf] = source
    plain.eval()
    return plain


def _tap_of(plain: torch.nn.Module, wrapped: torch.nn.Module, owners: dict, point_name: str | None) -> Tap | None:
    """The plain model's module behind a bridge hook point named `<component>.hook_in|hook_out`: the
    module at the component's HF path, or, where the bridge renamed it (GPT-2's attention output
    projection is its `o`, HF's `c_proj`), the module holding the same weight tensors."""
    if point_name is None:
        return None
    component, _, leaf = point_name.rpartition(".")
    if leaf not in ("hook_in", "hook_out"):
        return None  # a hook inside the bridge's own computation (attention scores, patterns, ...)
    try:
        module = plain.get_submodule(component.replace(ORIGINAL, ""))
    except AttributeError:
        original = wrapped.get_submodule(component)._modules.get(ORIGINAL.lstrip("."))
        weights = [] if original is None else list(original.parameters(recurse=False))
        module = owners.get(id(weights[0])) if weights else None
        if module is None:
            return None
    return Tap(module, reads_input=leaf == "hook_in")


def _agreeing_hooks(direct: DirectForward, bridge: Any, hook_points: dict[str, Any], d_vocab: int) -> list[str]:
    """The hooks whose activation on a few random tokens is the bridge's within the tolerance."""
    generator = torch.Generator().manual_seed(0)
    device = next(direct.model.parameters()).device
    tokens = torch.randint(0, d_vocab, _CHECK_SHAPE, generator=generator).to(device)
    hooks = list(direct.taps)
    theirs, ours = {}, {}

    def keeping(store: dict, hook: str) -> Callable[..., None]:
        def keep(tensor: torch.Tensor, **_) -> None:
            store[hook] = tensor.detach().flatten(2).float().clone()

        return keep

    removers = [direct.taps[hook].attach(keeping(ours, hook)) for hook in hooks]
    try:
        for hook in hooks:
            hook_points[hook].add_hook(keeping(theirs, hook), level=_CHECK_LEVEL)
        with torch.inference_mode():
            direct.run(tokens, logits=False)
            bridge.forward(tokens, return_type=None)
    except Exception:
        return []  # a module whose inputs or outputs are not what a tap reads: the bridge runs instead
    finally:
        for remove in removers:
            remove()
        for hook in hooks:
            hook_points[hook].remove_hooks("fwd", level=_CHECK_LEVEL)
    dtype = next(direct.model.parameters()).dtype
    tolerance = max(_FP32_TOLERANCE, 4 * torch.finfo(dtype).eps)
    agreeing = []
    for hook in hooks:
        a, b = ours.get(hook), theirs.get(hook)
        if a is None or b is None or a.shape != b.shape:
            continue
        scale = b.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        if bool(((a - b).abs() <= tolerance * scale).all()):
            agreeing.append(hook)
    return agreeing
