"""The offline defaults: the model, the text and the hook that `make all` uses."""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"


DEFAULT_DATASET = "python-docs"


DEFAULT_HOOK = "blocks.15.hook_resid_post"
