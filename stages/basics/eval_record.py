"""eval.json read back: report, compare, info and the API take its values as numbers, histograms and
per-hook tables, so a hand-edited, truncated or foreign file is refused in one line naming the field,
not drawn as a wrong plot or met as a traceback deep inside matplotlib."""

from __future__ import annotations

import math
from pathlib import Path

from stages.basics import run_dir
from stages.basics.errors import SaepipeError

TEXT_FIELDS = ("run", "store", "store_fingerprint", "hook", "in_hook", "model")
HISTOGRAMS = ("l0_histogram", "log10_density_histogram")
HOOK_LISTS = ("in_hooks", "out_hooks")  # a crosscoder's or CLT's
MAX_BINS = 1 << 20  # eval writes some hundreds; a bound before anything is plotted from them


def read_eval(path: Path, fix: str) -> dict:
    """The eval.json at `path`, checked; a malformed one is a SaepipeError ending in `fix`."""
    record = run_dir.read_json(path, fix)
    problem = eval_problem(record)
    if problem is not None:
        raise SaepipeError(f"{path} is damaged ({problem}): {fix}")
    return record


def eval_problem(record: dict) -> str | None:
    """What makes `record` not an eval.json that `saepipe eval` wrote, or None."""
    sae = record.get("sae")
    if not isinstance(sae, dict) or not isinstance(sae.get("arch"), str):
        return "its 'sae' record names no architecture"
    for key in ("d_in", "d_sae"):
        if key in sae and not _whole(sae[key], minimum=1):
            return f"sae.{key} is {sae[key]!r}, not a positive whole number"
    if not _whole(record.get("eval_rows"), minimum=0):
        return f"eval_rows is {record.get('eval_rows')!r}, not a count of rows"
    for key, value in record.items():
        problem = _field_problem(key, value)
        if problem is not None:
            return problem
    return None


def _field_problem(key: str, value) -> str | None:
    if key in TEXT_FIELDS:
        return None if isinstance(value, str) else f"{key} is {value!r}, not text"
    if key in HISTOGRAMS:
        return _histogram_problem(key, value)
    if key == "per_hook":
        if not isinstance(value, dict) or not all(
            isinstance(v, dict) and _number(v.get("fve")) for v in value.values()
        ):
            return "per_hook is not a table of each written hook's metrics"
        return None
    if key == "per_layer":
        if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
            return "per_layer is not a table of per-layer lists"
        if len({len(v) for v in value.values()}) > 1:
            return "per_layer's lists differ in length"
        return None
    if key == "l0_quantiles":
        if not isinstance(value, dict) or not all(_number(v) for v in value.values()):
            return "l0_quantiles is not a table of numbers"
        return None
    if isinstance(value, dict):  # the sae record, probing, absorption, ground_truth: shown as they are
        return None
    if key in HOOK_LISTS:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else f"{key} is not a list of hook names"
    if isinstance(value, list):  # a list some later eval adds: shown as it is, so scalars only
        return None if all(isinstance(v, str) or _number(v) for v in value) else f"{key} holds nested values"
    return f"{key} is {value!r}, not a number" if not _number(value) else None


def _histogram_problem(key: str, value) -> str | None:
    if not isinstance(value, dict):
        return f"{key} is not a histogram"
    edges, counts = value.get("edges"), value.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or not 1 <= len(counts) <= MAX_BINS:
        return f"{key} has no edges and counts"
    if len(edges) != len(counts) + 1:
        return f"{key} has {len(edges)} edges for {len(counts)} counts"
    values = edges + counts + ([value["dead"]] if "dead" in value else [])
    if not all(_number(v) and math.isfinite(v) for v in values):
        return f"{key} holds a value that is not a finite number"
    return None


def _number(value) -> bool:
    """A metric: a number, or null where it is not defined (NaN when an older eval wrote it)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _whole(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
