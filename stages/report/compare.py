"""eval.json metrics of several runs side by side, grouped: the report's tables and `saepipe compare`."""

from __future__ import annotations

import json
import math

from stages.report.runs import EvaluatedRun

_RECONSTRUCTION = (
    "mse",
    "mse_per_token",
    "nmse",
    "fve",
    "fve_per_token",
    "nmse_vs_zero",
    "fve_vs_zero",
    "cosine",
    "l2_ratio",
    "relative_reconstruction_bias",
)

# Known keys in the order they are shown; keys eval adds later land in "other".
GROUPS: dict[str, tuple[str, ...]] = {
    "sae": ("arch", "d_in", "d_sae", "k"),
    "reconstruction (normalized)": _RECONSTRUCTION,
    "reconstruction (raw scale)": tuple("raw_" + key for key in _RECONSTRUCTION),
    "sparsity": (
        "l0",
        "l0_quantiles.p10",
        "l0_quantiles.p50",
        "l0_quantiles.p90",
        "l0_quantiles.max",
        "dead_fraction",
        "dense_fraction",
    ),
    "downstream": ("ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl", "kl_zero", "kl_div_score", "delta_loss"),
    "ablation": ("ablation_sparsity", "ablation_count"),
    "evaluated on": ("eval_rows", "downstream_tokens", "downstream_contexts", "splice_from", "model", "hook"),
}
_PREFIX_GROUPS = (
    ("raw_", "reconstruction (raw scale)"),
    ("ablation_", "ablation"),
    ("ce_", "downstream"),
    ("kl_", "downstream"),
    ("l0_", "sparsity"),
    ("per_hook.", "per written hook (crosscoders, CLTs)"),
    ("probing.per_class.", "k-sparse probing, per class"),
    ("probing.", "k-sparse probing"),
    ("ground_truth.", "ground truth"),
    ("absorption.per_letter.", "absorption, per letter"),
    ("absorption.", "absorption"),
    ("decoder_max_cosine", "core extras"),
    ("duplicate_fraction", "core extras"),
    ("encoder_decoder_cosine", "core extras"),
)
# Descriptions of the run or plot data, not metrics.
_NOT_METRICS = {"run", "store", "store_fingerprint", "sae", "l0_histogram", "log10_density_histogram"}


def flat_metrics(run: EvaluatedRun) -> dict:
    """eval.json as one level of scalars: the SAE's settings, nested dicts as `outer.inner`."""
    flat = {key: value for key, value in run.sae_config.items() if key in GROUPS["sae"]}
    for key, value in run.eval.items():
        if key in _NOT_METRICS:
            continue
        if isinstance(value, dict):
            flat |= {f"{key}.{inner}": v for inner, v in value.items() if _is_scalar(v)}
            for inner, v in value.items():  # per_hook: {hook: {metric: value}}
                if isinstance(v, dict):
                    flat |= {f"{key}.{inner}.{name}": x for name, x in v.items() if _is_scalar(x)}
        elif _is_scalar(value):
            flat[key] = value
    return flat


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def grouped_rows(runs: list[EvaluatedRun]) -> list[tuple[str, list[tuple[str, list]]]]:
    """[(group, [(metric, [value per run, None where missing])])], only metrics some run has."""
    flats = [flat_metrics(run) for run in runs]
    present = set().union(*flats)
    known = {key for keys in GROUPS.values() for key in keys}
    groups = {group: list(keys) for group, keys in GROUPS.items()}
    for key in sorted(present - known):  # keys newer than this table: placed by their prefix
        group = next((g for prefix, g in _PREFIX_GROUPS if key.startswith(prefix)), "other")
        groups.setdefault(group, []).append(key)
    out = []
    for group, keys in groups.items():
        rows = [(key, [flat.get(key) for flat in flats]) for key in keys if key in present]
        if rows:
            out.append((group, rows))
    return out


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.5g}"


def format_comparison(runs: list[EvaluatedRun]) -> str:
    """Metrics as rows, runs as columns (a run has many more metrics than a comparison has runs)."""
    grouped = grouped_rows(runs)
    key_width = max([len("metric")] + [len(key) for _, rows in grouped for key, _ in rows]) + 2
    widths = [max(12, len(run.label) + 2) for run in runs]
    for _, rows in grouped:
        for _, values in rows:
            widths = [max(w, len(format_value(v)) + 2) for w, v in zip(widths, values)]
    lines = ["metric".ljust(key_width) + "".join(run.label.rjust(w) for run, w in zip(runs, widths))]
    lines.append("-" * len(lines[0]))
    for group, rows in grouped:
        lines.append(f"[{group}]")
        for key, values in rows:
            lines.append(key.ljust(key_width) + "".join(format_value(v).rjust(w) for v, w in zip(values, widths)))
    return "\n".join(lines)


def as_json(runs: list[EvaluatedRun]) -> str:
    """One object per run: its folder, label and flat metrics (NaN and infinities as null: valid JSON)."""

    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps(
        [
            {"run": str(run.path), "label": run.label} | {k: clean(v) for k, v in flat_metrics(run).items()}
            for run in runs
        ],
        indent=2,
    )
