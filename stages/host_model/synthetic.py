"""`--model synthetic` (or `synthetic-d<N>`): a stand-in host model for measuring collect at scale; and
`--model null-d<N>`, one that costs nothing, for measuring collect's own ceiling.

Its activations are a cheap deterministic function of token id and position (a seeded embedding of each,
summed, then an affine map per hook), computed in microseconds per context, so a collect of 100M tokens
spends its time in collect's own work (packing, normalization, shuffling, writing, committing) rather
than in a forward pass. It is run through the same hook points and `run_to_hooks` as a real model, and
its tokenizer is the byte-level one of the tiny test model. It has no logits: eval's downstream
metrics refuse it.

The null model does no work per token: every hook fires with the same preallocated rows (one random row
per position, the same for every context), so a collect with it spends all its time in collect's own
work, the part a GPU's forward pass would leave as the limit."""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch

from stages.basics.errors import SaepipeError
from stages.host_model.model import BLOCK_HOOKS, HostModel
from stages.host_model.tokenizers import ByteTokenizer

SYNTHETIC_NAME = "synthetic"
SYNTHETIC_D_MODEL = 32  # 100M tokens of one hook: 6.4 GB of fp16 rows
_NAME_RE = re.compile(r"^(synthetic|null)(?:-d(\d+))?$")
_LAYERS, _CONTEXT = 4, 4096


def is_synthetic(name: str) -> bool:
    return _NAME_RE.match(name.lower()) is not None


class SyntheticBridge(torch.nn.Module):
    """The part of TransformerBridge that collect uses: hook points, and a forward pass that fires them."""

    forward_name = "synthetic"  # what a store's header records as the forward pass that computed its rows

    def __init__(self, d_model: int, vocab_size: int, null: bool = False):
        from transformer_lens.hook_points import HookPoint  # slow to import; only booting a model needs it

        super().__init__()
        self.null = null
        self.forward_name = "null" if null else "synthetic"
        self.cfg = SimpleNamespace(d_model=d_model, n_layers=_LAYERS, d_vocab=vocab_size, n_ctx=_CONTEXT)
        rng = torch.Generator().manual_seed(0)
        self.register_buffer("token_embedding", torch.randn(vocab_size, d_model, generator=rng))
        self.register_buffer("position_embedding", 0.5 * torch.randn(_CONTEXT, d_model, generator=rng))
        self.hooks = torch.nn.ModuleDict(
            {f"{layer}_{suffix}": HookPoint() for layer in range(_LAYERS) for suffix in BLOCK_HOOKS}
        )
        self.hook_dict = {
            f"blocks.{layer}.{suffix}": self.hooks[f"{layer}_{suffix}"]
            for layer in range(_LAYERS)
            for suffix in BLOCK_HOOKS
        }

    @property
    def original_model(self) -> torch.nn.Module:  # what loading code reaches through to the HF model
        return self

    def forward(self, tokens: torch.Tensor, return_type=None, stop_at_layer: int | None = None):
        if return_type is not None:
            raise SaepipeError(
                "the synthetic model has no logits (it stands in for a model only to measure collect): "
                "evaluate with --no-downstream, or use a real model"
            )
        if self.null:  # the same rows for every context: no work per token
            x = self.position_embedding[: tokens.shape[1]].expand(tokens.shape[0], -1, -1)
            for layer in range(_LAYERS if stop_at_layer is None else stop_at_layer):
                for suffix in BLOCK_HOOKS:
                    self.hook_dict[f"blocks.{layer}.{suffix}"](x)
            return None
        x = self.token_embedding[tokens] + self.position_embedding[: tokens.shape[1]]
        for layer in range(_LAYERS if stop_at_layer is None else stop_at_layer):
            for step, suffix in enumerate(BLOCK_HOOKS):
                self.hook_dict[f"blocks.{layer}.{suffix}"](x * (1 + 0.1 * layer) + 0.01 * step)
        return None


def load_synthetic(name: str, device: torch.device, dtype_name: str) -> HostModel:
    kind, width = _NAME_RE.match(name.lower()).groups()
    if kind == "null" and width is None:
        raise SaepipeError("the null model needs its width: use --model null-d<N>, e.g. null-d576")
    d_model = SYNTHETIC_D_MODEL if width is None else int(width)
    if not 1 <= d_model <= 65_536:
        raise SaepipeError(f"{kind} model width {d_model} is out of range: use {kind}-d<1..65536>")
    tokenizer = ByteTokenizer()
    bridge = SyntheticBridge(d_model, tokenizer.vocab_size, null=kind == "null").to(device)
    return HostModel(
        name=name.lower(),
        bridge=bridge,
        tokenizer=tokenizer,
        d_model=d_model,
        n_layers=_LAYERS,
        revision=f"{kind}-v1",
        dtype=dtype_name,
        device=device,
        hook_points=dict(bridge.hook_dict),
    )
