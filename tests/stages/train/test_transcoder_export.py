"""Transcoders exported to SAELens's transcoder formats: loaded by sae-lens itself, they map the model's raw
MLP input to the same raw MLP output as the run does (the normalizations folded into the weights)."""

import warnings

import pytest
import torch

from pipeline import api
from tests.helpers.cli import run, run_ok

pytest.importorskip("sae_lens")

from tests.conftest import MLP_IN as IN
from tests.conftest import MLP_OUT as OUT


def train(store, out, arch, activation):
    return run("train", store, "--arch", arch, "--activation", activation, "--in-hook", IN, "--out-hook", OUT,
               "--width", 64, "--tokens", 10240, "--batch-size", 256, "--no-progress", "--out", out)  # fmt: skip


@pytest.mark.parametrize(
    "arch, activation, saelens_class",
    [
        ("transcoder", "relu", "Transcoder"),
        ("skip_transcoder", "relu", "SkipTranscoder"),
        ("transcoder", "jumprelu", "JumpReLUTranscoder"),
        ("skip_transcoder", "jumprelu", "JumpReLUSkipTranscoder"),
        ("transcoder", "batchtopk", "JumpReLUTranscoder"),  # its learned threshold, as for SAEs
    ],
)
def test_saelens_loads_the_export_and_matches_on_raw_activations(mlp_store, tmp_path, arch, activation, saelens_class):
    from sae_lens import SAE

    assert train(mlp_store, tmp_path / "run", arch, activation).exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAE.load_from_disk(str(tmp_path / "run" / "saelens"))
    assert type(theirs).__name__ == saelens_class
    assert theirs.cfg.metadata.hook_name == IN and theirs.cfg.d_out == 64
    ours = api.load_run(tmp_path / "run")
    x = api.open_store(mlp_store).rows(0, 200, hook=IN, split="eval", raw=True).acts
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-4)
        expected = ours(x)
        assert ((theirs(x) - expected).abs().max() / expected.abs().max()) < 1e-5


def test_a_topk_transcoder_has_no_saelens_export_and_says_why(mlp_store, tmp_path):
    result = train(mlp_store, tmp_path / "run", "transcoder", "topk")
    assert result.exit_code == 0
    assert "SAELens has no transcoder of 'topk' activations" in result.output
    assert not (tmp_path / "run" / "saelens").exists() and (tmp_path / "run" / "sae.safetensors").exists()
    run_ok("eval", tmp_path / "run", "--no-model", "--no-progress")  # the run itself is complete


def test_the_api_reads_the_export_as_the_run(mlp_store, tmp_path):
    assert train(mlp_store, tmp_path / "run", "skip_transcoder", "jumprelu").exit_code == 0
    x = api.open_store(mlp_store).rows(0, 100, hook=IN, split="eval", raw=True).acts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = api.load_run(tmp_path / "run" / "saelens")
    with torch.no_grad():
        ours = api.load_run(tmp_path / "run")(x)
        assert torch.allclose(exported(x), ours, atol=1e-4 * float(ours.abs().max()))
