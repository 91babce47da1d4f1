"""`saepipe export --format circuit-tracer`: per-layer transcoder sets and CLTs of the tiny model written in
circuit-tracer's files, checked by computing what circuit-tracer computes from those files (its
transcoders' encode and decode, as in circuit_tracer 0.5.0's SingleLayerTranscoder and
CrossLayerTranscoder) against our runs on raw activations."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import api
from stages.basics import run_dir
from tests.helpers.cli import expect_error, run, run_ok
from tests.helpers.collect import cli_args

LAYERS = 4  # the tiny model's
TRAIN = ("--width", 32, "--tokens", 8192, "--batch-size", 512, "--no-progress")
# (arch, activation, settings) per layer: every kind circuit-tracer's files hold
PER_LAYER = [
    ("transcoder", "relu", ()),
    ("skip_transcoder", "jumprelu", ("--target-l0", 4)),
    ("transcoder", "batchtopk", ("--k", 4)),
    ("skip_transcoder", "relu", ()),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "s.zarr"
    hooks = (f"blocks.{{0-{LAYERS - 1}}}.mlp.hook_in", f"blocks.{{0-{LAYERS - 1}}}.hook_mlp_out")
    run_ok("collect", *cli_args(*hooks, tokens=4000), "--out", path)
    return path


@pytest.fixture(scope="module")
def layer_runs(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-runs")
    runs = []
    for layer, (arch, activation, settings) in enumerate(PER_LAYER):
        out = root / f"layer{layer}"
        run_ok("train", store, "--arch", arch, "--activation", activation, "--in-hook", f"blocks.{layer}.mlp.hook_in",
               "--out-hook", f"blocks.{layer}.hook_mlp_out", *settings, *TRAIN, "--out", out)  # fmt: skip
        runs.append(out)
    return runs


def raw_rows(store, hook, n=200):
    return api.open_store(store).rows(0, n, hook=hook, split="eval", raw=True).acts


def circuit_tracer_activation(pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    return pre.relu() if threshold is None else pre * (pre > threshold)


def test_a_per_layer_set_computes_what_our_runs_compute(store, layer_runs, tmp_path):
    out = tmp_path / "set"
    assert "circuit-tracer folder ready" in run_ok("export", *layer_runs, "--out", out).output
    config = (out / "config.yaml").read_text()
    for line in ('model_kind: "transcoder_set"', 'feature_input_hook: "mlp.hook_in"', 'model_name: "tiny-random"'):
        assert line in config
    for layer, run_folder in enumerate(layer_runs):
        tensors = load_file(out / f"layer_{layer}.safetensors")
        skip = PER_LAYER[layer][0] == "skip_transcoder"
        expected = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"W_skip"} if skip else set())
        expected |= {"activation_function.threshold"} if PER_LAYER[layer][1] != "relu" else set()
        assert set(tensors) == expected, layer  # circuit-tracer loads them strictly
        assert tensors["W_enc"].shape == (32, 64) and tensors["W_dec"].shape == (32, 64)
        x = raw_rows(store, f"blocks.{layer}.mlp.hook_in")
        pre = x @ tensors["W_enc"].T + tensors["b_enc"]
        y = circuit_tracer_activation(pre, tensors.get("activation_function.threshold")) @ tensors["W_dec"]
        y = y + tensors["b_dec"] + (x @ tensors["W_skip"].T if skip else 0)
        with torch.no_grad():
            ours = api.load_run(run_folder)(x)
        torch.testing.assert_close(y, ours, rtol=1e-4, atol=1e-4, msg=f"layer {layer}")


def test_a_clt_computes_what_our_run_computes(store, tmp_path):
    run = tmp_path / "clt"
    run_ok("train", store, "--arch", "clt", "--activation", "batchtopk", "--layers", f"0-{LAYERS - 1}", "--k", 4,
           *TRAIN, "--out", run)  # fmt: skip
    out = tmp_path / "clt-export"
    run_ok("export", run, "--out", out)
    assert 'model_kind: "cross_layer_transcoder"' in (out / "config.yaml").read_text()
    xs = [raw_rows(store, f"blocks.{layer}.mlp.hook_in") for layer in range(LAYERS)]
    acts, outputs = [], []
    for layer in range(LAYERS):
        enc, dec = load_file(out / f"W_enc_{layer}.safetensors"), load_file(out / f"W_dec_{layer}.safetensors")
        assert dec[f"W_dec_{layer}"].shape == (32, LAYERS - layer, 64)
        pre = xs[layer] @ enc[f"W_enc_{layer}"].T + enc[f"b_enc_{layer}"]
        acts.append((circuit_tracer_activation(pre, enc[f"threshold_{layer}"]), dec[f"W_dec_{layer}"]))
        # layer m's output: every earlier layer's writes into it (slice m − l of its decoder), plus its bias
        written = sum(a @ w[:, layer - source] for source, (a, w) in enumerate(acts))
        outputs.append(written + enc[f"b_dec_{layer}"])
    with torch.no_grad():
        ours = api.load_run(run)(torch.cat(xs, dim=1))
    torch.testing.assert_close(torch.cat(outputs, dim=1), ours, rtol=1e-4, atol=1e-4)


def test_what_circuit_tracer_cannot_read_is_refused_and_nothing_is_written(store, layer_runs, tmp_path):
    out = tmp_path / "refused"
    expect_error(run("export", *layer_runs[:3], "--out", out), "needs a transcoder for every layer 0-3 of tiny-random")
    expect_error(run("export", layer_runs[0], layer_runs[0], "--out", out), "two runs transcode layer 0")
    topk = tmp_path / "topk"
    run_ok("train", store, "--arch", "transcoder", "--in-hook", "blocks.3.mlp.hook_in", "--out-hook",
           "blocks.3.hook_mlp_out", "--k", 4, *TRAIN, "--out", topk)  # fmt: skip
    expect_error(run("export", *layer_runs[:3], topk, "--out", out), "hold ReLU and JumpReLU transcoders, not topk")
    part = tmp_path / "clt-part"
    run_ok("train", store, "--arch", "clt", "--activation", "batchtopk", "--layers", "1-2", "--k", 4, *TRAIN,
           "--out", part)  # fmt: skip
    expect_error(run("export", part, "--out", out), "circuit-tracer's CLT spans every layer of tiny-random (0-3)")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (out / "keep").mkdir(parents=True)
    expect_error(run("export", *layer_runs, "--out", out), "exists and is not empty: pass --overwrite")
    run_ok("export", *layer_runs, "--out", out, "--overwrite")
    assert not (out / "keep").exists() and (out / "layer_3.safetensors").exists()
    assert run_dir.CONFIG not in {p.name for p in out.iterdir()}


CIRCUIT_TRACER_PYTHON = os.environ.get("SAEPIPE_CIRCUIT_TRACER_PYTHON")


@pytest.mark.skipif(
    not CIRCUIT_TRACER_PYTHON,
    reason="needs a Python with circuit-tracer, which pins transformers<=4.57.3 (`make circuit-tracer` builds "
    "one and runs this test with SAEPIPE_CIRCUIT_TRACER_PYTHON set)",
)
def test_circuit_tracer_attributes_a_prompt_through_our_transcoders(tiny_gpt2_dir, tmp_path):
    """circuit-tracer itself loads our export of a local GPT-2's three per-layer transcoders, checks its
    replacement model's logits against the HF model's, and computes an attribution graph."""
    model_dir, _ = tiny_gpt2_dir
    store = tmp_path / "s.zarr"
    hooks = ("--hook", "blocks.{0-2}.mlp.hook_in", "--hook", "blocks.{0-2}.hook_mlp_out")
    run_ok("collect", "--model", model_dir, *hooks, "--tokens", 3000, "--context-size", 32, "--chunk-rows", 256,
           "--warmup-rows", 500, "--no-progress", "--out", store)  # fmt: skip
    runs = []
    for layer in range(3):
        runs.append(tmp_path / f"layer{layer}")
        run_ok("train", store, "--arch", "skip_transcoder", "--activation", "jumprelu", "--in-hook",
               f"blocks.{layer}.mlp.hook_in", "--out-hook", f"blocks.{layer}.hook_mlp_out", *TRAIN, "--out", runs[-1])  # fmt: skip
    run_ok("export", *runs, "--out", tmp_path / "export")
    script = Path(__file__).parents[3] / "pipeline" / "tools" / "circuit_tracer_graph.py"
    done = subprocess.run(
        [CIRCUIT_TRACER_PYTHON, script, model_dir, tmp_path / "export", tmp_path / "graph", "--prompt", "abc abc ab"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "graph" / "graph.json").read_text())
    assert summary["max_logit_gap_vs_hf"] < 1e-3 and summary["active_features"] > 0
    assert 0 <= summary["replacement_score"] <= 1 and (tmp_path / "graph" / "graph.png").stat().st_size > 10_000
