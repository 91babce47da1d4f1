"""`make gpu-check`'s dry run (`--device cpu`): every step of the GPU check runs at toy sizes on the tiny
model, so the script a lent GPU runs first has run here; a step that breaks is recorded and the rest run."""

import json
import statistics
import time

import pytest
import torch

from benchmarks import gpu_check
from stages.basics.errors import SaepipeError


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("sae_lens")
    pytest.importorskip("sparsify")
    out = tmp_path_factory.mktemp("gpu")
    cfg = gpu_check.GpuCheckConfig(out=out, device="cpu", model="tiny-random", progress=False)
    return out, gpu_check.run_gpu_check(cfg)


def test_every_step_runs_on_a_cpu(dry_run):
    out, result = dry_run
    failures = {name: record.get("traceback") for name, record in result["steps"].items() if not record["ok"]}
    assert not failures, failures
    assert list(result["steps"]) == list(gpu_check.STEP_BUDGETS)  # every step has a budget, in priority order
    assert json.loads((out / "gpu.json").read_text()) == result and result["ok"]
    assert result["budgets_s"] == gpu_check.STEP_BUDGETS
    # within their budgets, which on a CPU at toy sizes they keep by far
    assert all(record["seconds"] < gpu_check.STEP_BUDGETS[name] for name, record in result["steps"].items())


def test_every_architecture_trains_resident_and_streaming(dry_run):
    _, result = dry_run
    runs = result["steps"]["train_loop"]["runs"]
    archs = gpu_check.ALL_ARCHS
    assert sorted(runs) == sorted(f"{arch}-{mode}" for arch in archs for mode in ("resident", "streaming"))
    assert all(run["tokens_per_s"] > 0 for run in runs.values())


def test_every_architectures_step_is_timed_at_both_sizes(dry_run):
    _, result = dry_run
    record = result["steps"]["train_steps"]
    sizes = [f"d{d}_w{w}" for d, w in gpu_check.DRY_SIZES.bench]
    assert list(record["sizes"]) == sizes
    for size in sizes:
        timings = record["sizes"][size]
        assert list(timings) == list(gpu_check.ALL_ARCHS)
        for timing in timings.values():  # one batch of batch_size rows a step
            assert timing["tokens_per_s"] == pytest.approx(timing["steps_per_s"] * record["batch_size"])
    summary = gpu_check.format_gpu_check(result)
    assert f"{sizes[1]} steps/s: topk " in summary and "clt " in summary


def test_the_profiles_summarize_the_forward_and_the_topk_step(dry_run):
    out, _ = dry_run
    profile = (out / "profile.txt").read_text()
    d, width = gpu_check.DRY_SIZES.bench[0]
    assert "== collect's forward pass to 5 hooks, 16 contexts" in profile
    assert f"== TopK training step x3, d {d}, width {width}" in profile
    assert "aten::topk" in profile and "Self CPU" in profile  # the table, by self time


def test_the_figures_the_gpu_run_reports(dry_run):
    out, result = dry_run
    steps = result["steps"]
    assert steps["collect"]["tokens_per_s"] > 0 and len(steps["collect"]["hooks"]) == 5
    # tiny-random has no HF model under it: one forward pass to time, the bridge's
    assert steps["collect"]["forward"] == "transformer-bridge"
    assert list(steps["collect"]["forward_tokens_per_s"]) == ["transformer-bridge"]
    assert steps["collect"]["forward_tokens_per_s"]["transformer-bridge"] > 0
    assert 0 <= steps["eval"]["ce_recovered"] <= 1.5 and steps["eval"]["kl"] >= 0
    assert steps["nccl"]["backend"] == "gloo"  # NCCL on CUDA
    dry = gpu_check.DRY_SIZES
    for which, name in enumerate(("bench_d768", "bench_d2304")):
        d_in, width = dry.bench[which]
        record = steps[name]
        assert record["sizes"] == {
            "d_in": d_in, "width": width, "k": dry.k, "batch_size": dry.bench_batch, "rounds": dry.bench_rounds
        }  # fmt: skip
        # each figure is the bench's own, from the raw rates its bench.json keeps beside it
        written = json.loads((out / f"bench-d{d_in}" / "bench.json").read_text())
        for key, raw, top, bottom in (
            ("train_vs_saelens", written["train"], "ours_tokens_per_s", "saelens_tokens_per_s"),
            ("train_vs_sparsify", written["sparsify"][f"width_{width}"], "ours_tokens_per_s", "sparsify_tokens_per_s"),
            ("mp_vs_saelens", written["mp"], "ours_tokens_per_s", "saelens_tokens_per_s"),
        ):
            assert len(raw[top]) == len(raw[bottom]) == dry.bench_rounds, (name, key)
            assert record[key] == written[key], (name, key)
            assert written[key] == pytest.approx(statistics.median(raw[top]) / statistics.median(raw[bottom])), key
        train = written["train"]
        assert record["train_roofline_fraction"] == pytest.approx(
            train["achieved_flop_per_s"] / train["matmul_flop_per_s"]
        )
    first = steps["bench_d768"]
    # the goal's figure: our TopK step's median rate at the first size, in steps (batches) a second
    ours = json.loads((out / f"bench-d{dry.bench[0][0]}" / "bench.json").read_text())["train"]["ours_tokens_per_s"]
    assert first["steps_per_s"] == pytest.approx(statistics.median(ours) / dry.bench_batch)
    assert first["goal_steps_per_s"] == gpu_check.GOAL_STEPS_PER_S and "steps_per_s" not in steps["bench_d2304"]
    assert "FAILED" not in gpu_check.format_gpu_check(result)


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check.GpuCheck, "environment", broken)
    cfg = gpu_check.GpuCheckConfig(out=tmp_path, device="cpu", model="tiny-random", only="environment,collect")
    result = gpu_check.run_gpu_check(cfg)
    assert not result["ok"] and result["steps"]["collect"]["ok"]
    assert (
        result["steps"]["environment"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    )
    assert "FAILED: RuntimeError: CUDA error" in gpu_check.format_gpu_check(result)


def test_a_step_past_its_budget_is_cut_keeping_its_figures_and_the_next_still_runs(tmp_path, monkeypatch):
    pytest.importorskip("sae_lens")
    pytest.importorskip("sparsify")
    timed = []

    def third_one_hangs(self, store, hooks, arch, d_in, width):
        timed.append(arch)
        if len(timed) == 3:
            time.sleep(60)
        return {"steps_per_s": 1.0, "tokens_per_s": 256.0}

    monkeypatch.setattr(gpu_check.GpuCheck, "_time_step", third_one_hangs)
    cfg = gpu_check.GpuCheckConfig(
        out=tmp_path, device="cpu", only="train_steps,bench_d2304", budgets="train_steps=1.5", progress=False
    )
    result = gpu_check.run_gpu_check(cfg)
    cut = result["steps"]["train_steps"]
    assert cut["cut"] and not cut["ok"] and cut["error"] == "cut at its budget of 1.5 s"
    assert cut["seconds"] < 10  # cut where it hung, not at the end of the sleep
    first = f"d{gpu_check.DRY_SIZES.bench[0][0]}_w{gpu_check.DRY_SIZES.bench[0][1]}"
    assert list(cut["sizes"][first]) == list(gpu_check.ALL_ARCHS[:2])  # what it had timed before the cut
    assert result["steps"]["bench_d2304"]["ok"] and not result["ok"]
    assert "FAILED: cut at its budget of 1.5 s" in gpu_check.format_gpu_check(result)


def test_a_budget_cuts_through_code_that_catches_every_exception():
    caught = []
    with pytest.raises(gpu_check.OverBudget), gpu_check.time_budget(0.05):
        while True:
            try:
                time.sleep(0.01)
            except Exception as e:  # noqa: BLE001 - what a step's per-architecture loop does
                caught.append(e)
    assert not caught


@pytest.mark.parametrize("budgets", ["warp=3", "collect", "collect=0", "collect=soon"])
def test_a_budget_that_is_not_step_equals_seconds_is_refused(budgets):
    with pytest.raises(SaepipeError, match=rf"--budgets: '{budgets}' is not STEP=SECONDS"):
        gpu_check.parse_budgets(budgets)


def test_an_unknown_step_is_refused_before_any_work(tmp_path):
    cfg = gpu_check.GpuCheckConfig(out=tmp_path / "g", device="cpu", only="collect,warp")
    with pytest.raises(SaepipeError, match="--only: unknown step warp; known: environment, collect"):
        gpu_check.run_gpu_check(cfg)
    assert not (tmp_path / "g").exists()


def test_a_model_shape_folder_gives_that_model_with_random_weights(tmp_path, tiny_gpt2_dir):
    """What travels to a lent GPU: config and tokenizer, no weights (tiny_gpt2_dir's shape here)."""
    folder, _ = tiny_gpt2_dir
    shape = tmp_path / "shape"
    shape.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors" and f.name != "pytorch_model.bin":
            (shape / f.name).write_bytes(f.read_bytes())
    built = gpu_check.random_weights_model(shape, tmp_path / "built")
    assert (built / "config.json").exists() and list(built.glob("*.safetensors"))
    from stages.host_model.loading import load_host_model

    model = load_host_model(str(built), "cpu")
    assert model.n_layers == json.loads((shape / "config.json").read_text())["n_layer"]


def test_forward_rates_time_hfs_own_pass_beside_the_bridges(tiny_llama_dir):
    from stages.host_model.loading import load_host_model

    model = load_host_model(str(tiny_llama_dir[0]), "cpu")
    contexts = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0)).numpy()
    rates = gpu_check.forward_rates(model, ["blocks.1.hook_resid_post"], contexts, batch=4, rounds=1)
    assert sorted(rates) == ["hf-sdpa", "transformer-bridge"] and min(rates.values()) > 0
    assert model.direct is not None  # the bridge's side set the direct path aside on a copy only
