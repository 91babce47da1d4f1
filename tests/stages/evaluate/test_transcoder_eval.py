"""A transcoder trained from a store of the tiny model's MLP input and output, evaluated: fve of the MLP's
output predicted from its input, and CE/KL with the prediction spliced in for the MLP."""

import json

import pytest
import torch

from pipeline import api
from stages import collect as collect_stage
from stages.collect.config import CollectConfig
from tests.conftest import MLP_IN as IN
from tests.conftest import MLP_OUT as OUT
from tests.helpers.cli import expect_error, run, run_ok
from tests.helpers.collect import SETTINGS


@pytest.fixture(scope="module")
def transcoder_run(mlp_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("tc") / "run"
    run_ok("train", mlp_store, "--arch", "skip_transcoder", "--in-hook", IN, "--out-hook", OUT, "--width", 128,
           "--k", 8, "--tokens", 40960, "--batch-size", 512, "--no-progress", "--out", out)  # fmt: skip
    return out


def test_eval_scores_the_prediction_of_the_output_hook(mlp_store, transcoder_run):
    run_ok("eval", transcoder_run, "--tokens", 2048, "--no-progress")
    result = json.loads((transcoder_run / "eval.json").read_text())
    assert (result["hook"], result["in_hook"]) == (OUT, IN) and result["sae"]["arch"] == "skip_transcoder"
    # raw fve recomputed by hand: the API's module on the input's raw rows against the output's raw rows
    store, sae = api.open_store(mlp_store), api.load_run(transcoder_run)
    n = result["eval_rows"]
    x, y = (store.rows(0, n, hook=h, split="eval", raw=True).acts for h in (IN, OUT))
    with torch.no_grad():
        err = (sae(x) - y).pow(2).sum()
    assert result["raw_fve"] == pytest.approx(float(1 - err / (y - y.mean(0)).pow(2).sum()), abs=1e-4)
    assert result["fve"] > 0.5 and result["l0"] == pytest.approx(8)
    # the spliced prediction is closer to the clean model than zeroing the MLP's output
    assert result["ce_clean"] <= result["ce_sae"] < result["ce_zero"] and 0 < result["ce_recovered"] <= 1.01
    assert "ablation_sparsity" not in result
    info = run_ok("info", transcoder_run).output
    assert f"hook: {IN} -> {OUT}" in info and "fve" in info


def test_the_api_maps_raw_input_to_raw_output(mlp_store, transcoder_run):
    sae = api.load_run(transcoder_run)
    assert (sae.in_hook, sae.hook, sae.d_in, sae.d_out) == (IN, OUT, 64, 64)
    store = api.open_store(mlp_store)
    x = store.rows(0, 50, hook=IN, raw=True).acts
    with torch.no_grad():
        expected = store.normalization(OUT).invert(sae.sae(store.normalization(IN).apply(x)[0]))
        assert torch.allclose(sae(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs its input too"):
        sae.decode(sae.encode(x))


def test_a_transcoder_of_a_per_token_output_is_refused(tmp_path):
    path = tmp_path / "t.zarr"
    collect_stage.run_collect(
        CollectConfig(out=str(path), **dict(SETTINGS, hooks=(IN, OUT), tokens=2000, normalize="token"))
    )
    args = ["train", path, "--arch", "transcoder", "--in-hook", IN, "--out-hook", OUT, "--out", tmp_path / "run"]
    expect_error(run(*args), "normalizes blocks.1.hook_mlp_out per token")
    assert not (tmp_path / "run").exists()
