"""Crosscoders and cross-layer transcoders evaluated from a store of the tiny model's MLP inputs and outputs
at layers 0 and 1: fve of each written hook, L0 per layer, CE/KL with a CLT spliced in for both MLPs at
once; the API's modules on raw rows; the report's per-layer figure."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline import api
from stages.basics import run_dir
from tests.conftest import MLP_IN, MLP_OUT
from tests.helpers.cli import expect_error, run, run_ok
from tests.helpers.collect import cli_args

INS = ("blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in")
OUTS = ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")
TRAIN = ("--width", 64, "--k", 4, "--tokens", 40960, "--batch-size", 512, "--no-progress")


@pytest.fixture(scope="module")
def layers_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("layers") / "s.zarr"
    run_ok("collect", *cli_args("blocks.{0-1}.mlp.hook_in", "blocks.{0-1}.hook_mlp_out", tokens=6000), "--out", path)
    return path


@pytest.fixture(scope="module")
def clt_run(layers_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("clt") / "run"
    run_ok("train", layers_store, "--arch", "clt", "--layers", "0-1", *TRAIN, "--out", out)
    return out


@pytest.fixture(scope="module")
def crosscoder_run(layers_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("cc") / "run"
    run_ok("train", layers_store, "--arch", "crosscoder", "--hook", OUTS[0], "--hook", OUTS[1], *TRAIN, "--out", out)
    return out


def raw_fve_by_hand(store_path, run, hooks_in, hooks_out, n):
    """fve of the API's module on raw rows, all written hooks side by side."""
    store, module = api.open_store(store_path), api.load_run(run)
    x = torch.cat([store.rows(0, n, hook=h, split="eval", raw=True).acts for h in hooks_in], dim=1)
    y = torch.cat([store.rows(0, n, hook=h, split="eval", raw=True).acts for h in hooks_out], dim=1)
    with torch.no_grad():
        err = (module(x) - y).pow(2).sum()
    return float(1 - err / (y - y.mean(0)).pow(2).sum())


def test_a_clt_is_scored_per_layer_and_spliced_into_every_mlp(layers_store, clt_run):
    table = run_ok("eval", clt_run, "--tokens", 2048, "--no-progress").output
    result = json.loads((clt_run / run_dir.EVAL).read_text())
    assert (result["in_hooks"], result["out_hooks"]) == (list(INS), list(OUTS))
    assert set(result["per_hook"]) == set(OUTS) and result["per_layer"]["layer"] == [0, 1]
    assert result["per_layer"]["l0"] == pytest.approx([4, 4]) and result["l0"] == pytest.approx(8)
    assert result["per_layer"]["fve"] == [result["per_hook"][h]["fve"] for h in OUTS]
    assert result["raw_fve"] == pytest.approx(
        raw_fve_by_hand(layers_store, clt_run, INS, OUTS, result["eval_rows"]), abs=1e-4
    )
    assert result["fve"] > 0.4
    # both MLP outputs replaced by the CLT's predictions: closer to the clean model than both zeroed
    assert result["ce_clean"] <= result["ce_sae"] < result["ce_zero"] and 0 < result["ce_recovered"] <= 1.01
    assert f"fve {OUTS[1]}" in table and "l0 per layer" in table
    assert "layers 0-1: blocks.L.mlp.hook_in -> blocks.L.hook_mlp_out" in run_ok("info", clt_run).output


def test_a_crosscoder_is_scored_per_hook_without_a_splice(layers_store, crosscoder_run):
    run_ok("eval", crosscoder_run, "--tokens", 2048, "--no-progress")
    result = json.loads((crosscoder_run / run_dir.EVAL).read_text())
    assert set(result["per_hook"]) == set(OUTS) and "per_layer" not in result and "ce_sae" not in result
    hooks = result["per_hook"]
    assert min(h["fve"] for h in hooks.values()) <= result["fve"] <= max(h["fve"] for h in hooks.values())
    assert result["raw_fve"] == pytest.approx(
        raw_fve_by_hand(layers_store, crosscoder_run, OUTS, OUTS, result["eval_rows"]), abs=1e-4
    )


def test_the_report_draws_each_written_hook_and_layer(clt_run, crosscoder_run, tmp_path):
    for folder in (clt_run, crosscoder_run):
        if not (folder / run_dir.EVAL).exists():
            run_ok("eval", folder, "--tokens", 2048, "--no-progress", "--no-model")
    run_ok("report", clt_run, crosscoder_run, "--no-model", "--no-progress", "--out", tmp_path / "report")
    assert (tmp_path / "report" / "per_hook.png").stat().st_size > 10_000
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"per_hook.{OUTS[0]}.fve" in page


def test_a_one_layer_clt_scores_as_the_transcoder_with_its_weights(mlp_store, tmp_path):
    """The CLT's eval and splice against the transcoder's, an independent path: equal weights, equal metrics."""
    run_ok("train", mlp_store, "--arch", "clt", "--layers", "1-1", *TRAIN, "--out", tmp_path / "clt")
    run_ok("train", mlp_store, "--arch", "transcoder", "--in-hook", MLP_IN, "--out-hook", MLP_OUT, *TRAIN,
           "--tokens", 1024, "--out", tmp_path / "tc")  # fmt: skip
    clt = api.load_run(tmp_path / "clt").sae
    weights = {"W_enc": clt.W_enc[0], "b_enc": clt.b_enc[0], "W_dec": clt.W_dec[0], "b_dec": clt.b_dec}
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, tmp_path / "tc" / run_dir.SAE_WEIGHTS)
    results = {}
    for name in ("clt", "tc"):
        run_ok("eval", tmp_path / name, "--tokens", 1024, "--no-progress", "--ablation-contexts", 0)
        results[name] = json.loads((tmp_path / name / run_dir.EVAL).read_text())
    for key in ("fve", "raw_fve", "cosine", "l0", "dead_fraction", "ce_sae", "ce_zero", "kl", "downstream_tokens"):
        assert results["clt"][key] == pytest.approx(results["tc"][key], rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def transcoder_runs(layers_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    for layer in range(2):
        run_ok("train", layers_store, "--arch", "transcoder", "--in-hook", INS[layer], "--out-hook", OUTS[layer],
               *TRAIN, "--out", root / f"layer{layer}")  # fmt: skip
    return [root / "layer0", root / "layer1"]


def test_a_transcoder_set_is_spliced_into_every_mlp_at_once(transcoder_runs, tmp_path):
    out = run_ok("eval-set", transcoder_runs[1], transcoder_runs[0], "--tokens", 2048, "--no-progress",
                 "--out", tmp_path / "set").output  # fmt: skip
    result = json.loads((tmp_path / "set" / "set_eval.json").read_text())
    assert result["per_layer"]["layer"] == [0, 1] and result["per_layer"]["l0"] == pytest.approx([4, 4])
    assert result["ce_clean"] <= result["ce_sae"] < result["ce_zero"] and 0 < result["ce_recovered"] <= 1.01
    assert "ce_recovered" in out and "written:" in out
    # a set of one is the transcoder's own eval: the same splice, the same positions
    run_ok("eval", transcoder_runs[1], "--tokens", 2048, "--no-progress", "--ablation-contexts", 0)
    single = json.loads((transcoder_runs[1] / run_dir.EVAL).read_text())
    run_ok("eval-set", transcoder_runs[1], "--tokens", 2048, "--no-progress", "--out", tmp_path / "one")
    one = json.loads((tmp_path / "one" / "set_eval.json").read_text())
    for key in ("ce_sae", "ce_zero", "kl", "downstream_tokens"):
        assert one[key] == pytest.approx(single[key], rel=1e-6), key
    assert one["per_layer"]["fve"] == [pytest.approx(single["fve"], rel=1e-6)]
    # both layers spliced at once cost more than the second alone
    assert result["ce_sae"] > one["ce_sae"]


def test_a_set_refuses_what_is_not_one_set(transcoder_runs, clt_run, mlp_store, tmp_path):
    expect_error(run("eval-set", transcoder_runs[0], clt_run, "--out", tmp_path / "a"), "is a clt run: eval-set")
    expect_error(
        run("eval-set", transcoder_runs[0], transcoder_runs[0], "--out", tmp_path / "b"),
        "several runs write layer 0's MLP output: pass one per layer",
    )
    other = tmp_path / "other"
    run_ok(
        "train", mlp_store, "--arch", "transcoder", "--in-hook", MLP_IN, "--out-hook", MLP_OUT, *TRAIN, "--out", other
    )
    expect_error(
        run("eval-set", transcoder_runs[0], other, "--out", tmp_path / "c"), "the runs were trained on different stores"
    )
    assert not any((tmp_path / name).exists() for name in "abc")


def test_suite_all_runs_what_applies_to_a_crosscoder_and_refuses_what_is_named(crosscoder_run):
    run_ok("eval", crosscoder_run, "--tokens", 512, "--no-progress", "--no-model", "--suite", "all")
    result = json.loads((crosscoder_run / run_dir.EVAL).read_text())
    assert "duplicate_fraction" in result and "probing" not in result and "absorption" not in result
    expect_error(
        run("eval", crosscoder_run, "--tokens", 512, "--suite", "probing"),
        "--suite probing does not apply here: it reads one hook; a crosscoder reads several",
    )
