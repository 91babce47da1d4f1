"""eval.json as report, compare, info and the API read it back: each field they use is checked, an
undefined metric is written as null (valid JSON), and an eval.json an older saepipe wrote still reads."""

import json
import math

import pytest

from stages.basics import run_dir
from stages.basics.errors import SaepipeError
from stages.basics.eval_record import eval_problem, read_eval

WRITTEN = {
    "run": "r",
    "store": "s.zarr",
    "store_fingerprint": "4bd8ff94b11991ff",
    "hook": "blocks.2.hook_resid_post",
    "sae": {"arch": "topk", "d_in": 64, "d_sae": 256, "k": 8},
    "eval_rows": 1054,
    "fve": 0.83,
    "l0": 8.0,
    "l0_quantiles": {"p10": 8, "p50": 8, "p90": 8, "max": 8},
    "l0_histogram": {"edges": [0, 1, 2], "counts": [0, 1054]},
    "log10_density_histogram": {"edges": [-6.0, -5.0, -4.0], "counts": [3, 4], "dead": 0},
    "ablation_sparsity": None,
    "per_hook": {"blocks.1.hook_resid_post": {"fve": 0.5}},
    "per_layer": {"layer": [0, 1], "l0": [3.0, 4.0]},
    "out_hooks": ["blocks.1.hook_resid_post"],
    "probing": {"sae_top_1_accuracy": 0.7, "per_class": {"a": {"accuracy": 0.5}}},
}


def _with(**changes) -> dict:
    return {**json.loads(json.dumps(WRITTEN)), **changes}


def test_an_eval_json_as_eval_writes_it_passes():
    assert eval_problem(WRITTEN) is None


def test_an_older_eval_json_with_nan_for_an_undefined_metric_still_reads(tmp_path):
    """Before null, eval wrote NaN for an ablation sparsity with no ablation: Python's JSON reads it."""
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(_with(ablation_sparsity=float("nan"))))
    assert math.isnan(read_eval(path, "fix")["ablation_sparsity"])


@pytest.mark.parametrize(
    "record, problem",
    [
        ({}, "its 'sae' record names no architecture"),
        (_with(sae=[1]), "its 'sae' record names no architecture"),
        (_with(sae={"arch": "topk", "d_sae": "x"}), "sae.d_sae is 'x', not a positive whole number"),
        (_with(sae={"arch": "topk", "d_in": 0}), "sae.d_in is 0, not a positive whole number"),
        (_with(eval_rows=-1), "eval_rows is -1, not a count of rows"),
        (_with(eval_rows=True), "eval_rows is True, not a count of rows"),
        (_with(fve="high"), "fve is 'high', not a number"),
        (_with(out_hooks=[1]), "out_hooks is not a list of hook names"),
        (_with(l0=[{"a": 1}]), "l0 holds nested values"),
        (_with(hook=3), "hook is 3, not text"),
        (_with(l0_quantiles=[1]), "l0_quantiles is not a table of numbers"),
        (_with(l0_quantiles={"p10": "x"}), "l0_quantiles is not a table of numbers"),
        (_with(l0_histogram="x"), "l0_histogram is not a histogram"),
        (_with(log10_density_histogram={"a": 1}), "log10_density_histogram has no edges and counts"),
        (_with(log10_density_histogram={"edges": [0], "counts": [1]}), "has 1 edges for 1 counts"),
        (_with(l0_histogram={"edges": [0, "1"], "counts": [1]}), "l0_histogram holds a value that is not a finite"),
        (_with(per_hook={"h": {"fve": "x"}}), "per_hook is not a table of each written hook's metrics"),
        (_with(per_layer={"layer": [0, 1], "l0": [1.0]}), "per_layer's lists differ in length"),
    ],
)
def test_a_malformed_field_is_named(record, problem):
    assert problem in eval_problem(record)


def test_read_eval_names_the_file_the_field_and_the_fix(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(_with(fve="high")))
    with pytest.raises(SaepipeError, match=r"eval.json is damaged \(fve is 'high', not a number\): evaluate again$"):
        read_eval(path, "evaluate again")


def test_non_finite_floats_are_written_as_null(tmp_path):
    path = tmp_path / "doc.json"
    run_dir.write_json_atomic(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None}}
