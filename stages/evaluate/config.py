"""An evaluation's settings, checked before anything is read or written."""

from __future__ import annotations

from dataclasses import dataclass

from stages.basics.errors import require
from stages.basics.settings import device_setting, progress_setting, setting


@dataclass
class EvalConfig:
    run: str  # the run folder (eval.json is written there); with `external`, any folder to write into
    store: str | None = setting(None, "the store to evaluate on", shown_default="the store the SAE was trained on")
    model: str | None = setting(None, "the host model for CE/KL", shown_default="the store's model")
    tokens: int | None = setting(None, "at most this many held-out tokens", shown_default="all")
    use_model: bool = setting(True, "store-only metrics; do not load the model", flag="--no-model", inverted=True)
    splice_from: int = setting(0, "splice the SAE in only at positions >= this one")
    ablation_contexts: int = setting(4, "held-out contexts for ablation sparsity (0: skip it)")
    external: str | None = setting(
        None, "a SAELens SAE folder trained elsewhere: evaluate it on --store, writing into RUN"
    )
    device: str = device_setting()
    progress: bool = progress_setting()

    def validate(self) -> EvalConfig:
        require(
            self.tokens is None or self.tokens >= 1,
            f"--tokens must be at least 1, got {self.tokens} (leave it out to use every held-out row)",
        )
        require(
            self.ablation_contexts >= 0,
            f"--ablation-contexts must be at least 0 (0 skips ablation sparsity), got {self.ablation_contexts}",
        )
        return self
