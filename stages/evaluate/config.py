"""An evaluation's settings, checked before anything is read or written."""

from __future__ import annotations

from dataclasses import dataclass

from stages.basics.errors import SaepipeError, require
from stages.basics.settings import device_setting, progress_setting, setting

# Evaluations `--suite` adds to the default ones (reconstruction, sparsity, CE/KL, ablation sparsity).
EXTRA_SUITES = ("core", "probing", "absorption", "ground-truth")


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
    suite: str = setting(
        "default", "evaluations beyond the default ones, comma-separated: core, probing, or all (docs/metrics.md)"
    )
    probe_data: str = setting(
        "stdlib-package", "k-sparse probing's labelled texts: stdlib-package, .jsonl/.parquet files or an HF data set"
    )
    probe_text_column: str = setting("text", "the probing data's text column")
    probe_label_column: str = setting("label", "the probing data's label column")
    absorption_words: int = setting(4000, "letter-only tokens sampled for absorption (80% train, 20% test)")
    truth: str | None = setting(
        None, "a synthetic store's planted directions (safetensors, key 'features') for --suite ground-truth"
    )
    device: str = device_setting()
    progress: bool = progress_setting()

    @property
    def suites(self) -> set[str]:
        """The extra evaluations asked for ("all": every one that can run: ground truth needs --truth, probing
        and absorption the model)."""
        names = {name.strip() for name in self.suite.split(",") if name.strip()} - {"default"}
        if "all" in names:
            needing_the_model = set() if self.use_model else {"probing", "absorption"}
            return set(EXTRA_SUITES) - (set() if self.truth else {"ground-truth"}) - needing_the_model
        return names

    def validate(self) -> EvalConfig:
        names = [name.strip() for name in self.suite.split(",") if name.strip()]
        unknown = [name for name in names if name not in (*EXTRA_SUITES, "default", "all")]
        if unknown:
            raise SaepipeError(
                f"--suite {unknown[0]!r} is not an evaluation suite: use default, {', '.join(EXTRA_SUITES)} or all"
            )
        require(
            self.tokens is None or self.tokens >= 1,
            f"--tokens must be at least 1, got {self.tokens} (leave it out to use every held-out row)",
        )
        require(
            self.ablation_contexts >= 0,
            f"--ablation-contexts must be at least 0 (0 skips ablation sparsity), got {self.ablation_contexts}",
        )
        require(
            "ground-truth" not in self.suites or self.truth is not None,
            "--suite ground-truth compares the SAE with planted features: pass --truth FILE (their directions)",
        )
        require(
            self.absorption_words >= 10 * 26,
            f"--absorption-words must be at least 260 (10 per letter), got {self.absorption_words}",
        )
        for suite in ("probing", "absorption"):
            require(
                suite not in self.suites or self.use_model,
                f"--suite {suite} runs the model on its texts: drop --no-model (or leave {suite} out of --suite)",
            )
        return self
