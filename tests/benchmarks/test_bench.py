"""The benchmark harness: sides alternate, FLOPs are counted as documented, and a tiny run of every
benchmark writes the keys, the raw timings behind them and sane values."""

import json
import statistics

import pytest

from benchmarks import bench
from tests.helpers.cli import expect_error, run


def test_sides_alternate_round_by_round():
    calls = []
    rates = bench.alternate({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b"] * 3
    assert rates == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert bench.ratio({"a": [1.0, 9.0, 3.0], "b": [2.0, 2.0, 2.0]}, "a", "b") == pytest.approx(1.5)  # medians


def test_topk_step_flops_counts_two_dense_gemms_and_a_sparse_decoder():
    # encoder forward + encoder weight gradient: 2 x 2BdW; decoder forward, code and row gradients: 3 x 2Bkd
    assert bench.topk_step_flops(batch=10, d_in=3, width=7, k=2) == 4 * 10 * 3 * 7 + 6 * 10 * 2 * 3


@pytest.mark.filterwarnings("ignore")
def test_tiny_bench_writes_every_key(tmp_path):
    pytest.importorskip("sae_lens")
    pytest.importorskip("sparsify")
    cfg = bench.BenchConfig(
        out=tmp_path / "bench",
        device="cpu",
        d_in=32,
        width=256,
        wide_width=512,
        k=4,
        batch_size=256,
        rounds=1,
        train_steps=2,
        read_rows=8192,
        model="tiny-random",
        collect_hook="blocks.1.hook_resid_post",
        collect_contexts=16,
        collect_batch=4,
        context_size=16,
        stream_chunk_rows=256,
        only=",".join(k for k in bench.KEYS if k != "collect_vs_saelens"),
        progress=False,
    )
    result = bench.run_bench(cfg)
    assert json.loads((tmp_path / "bench" / "bench.json").read_text()) == result
    for key in (
        "read_vs_memmap",
        "api_read_vs_loader",
        "two_hooks_read_vs_one",
        "train_vs_saelens",
        "train_roofline_fraction",
        "train_vs_sparsify",
        "train_vs_sparsify_16k",
        "mp_vs_saelens",
        "collect_vs_forward",
        "stream_peak_rss_gb",
    ):
        assert result[key] > 0, key
    # fsync's cost: the no-fsync side's ratio to the forward, minus collect_vs_forward, from the same rounds
    collect = result["collect"]
    no_fsync = statistics.median(collect["collect_no_fsync_tokens_per_s"]) / statistics.median(
        collect["forward_tokens_per_s"]
    )
    assert result["fsync_cost"] == pytest.approx(no_fsync - result["collect_vs_forward"])
    assert collect["forward"] == collect["collect_forward"] == "transformer-bridge"  # tiny-random is no HF model
    assert len(result["read"]["store_tokens_per_s"]) == len(result["read"]["memmap_tokens_per_s"]) == 1
    assert len(result["api_read"]["api_tokens_per_s"]) == len(result["api_read"]["loader_tokens_per_s"]) == 1
    assert len(result["two_hooks_read"]["two_hooks_bytes_per_s"]) == 1
    assert result["mp"]["reconstruction_max_rel_diff"] < 1e-3
    sparsify = result["sparsify"]
    assert sparsify["decoder"] == "eager_decode" and len(sparsify["width_512"]["sparsify_tokens_per_s"]) == 1
    stream = result["stream"]
    assert stream["store_bytes"] == 4 * stream["buffer_bytes"]
    assert 0 < stream["peak_rss_bytes"] < 8e9
    assert "| read_vs_memmap |" in bench.format_bench_table(result)


def tiny_collect_bench(tmp_path, model_dir, hook: str, only: str) -> bench.BenchConfig:
    """A one-round collect benchmark of 16 contexts of 16 tokens on a tiny local HF model."""
    return bench.BenchConfig(
        out=tmp_path / "bench", device="cpu", rounds=1, model=str(model_dir), collect_hook=hook,
        collect_contexts=16, collect_batch=4, context_size=16, only=only, progress=False,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore")
def test_tiny_collect_vs_saelens(tmp_path, tiny_gpt2_dir):
    """SAELens's cache runner runs the same local HF checkpoint, hooked at the matching decoder block,
    and caches exactly the rows our collect stores (every context, position 0 left out)."""
    pytest.importorskip("sae_lens")
    from datasets import load_from_disk

    result = bench.run_bench(
        tiny_collect_bench(tmp_path, tiny_gpt2_dir[0], "blocks.1.hook_resid_post", "collect_vs_saelens")
    )
    assert result["collect_vs_saelens"] > 0
    # the profile of each side: its matrix products among the ops, and where the rest of its time went
    for side in result["collect_saelens"]["profile"].values():
        assert side["wall_s"] > 0 and side["torch_ops_s"] > 0
        assert side["outside_torch_ops_s"] == pytest.approx(side["wall_s"] - side["torch_ops_s"])
        assert any(op in side["top_ops"] for op in ("aten::addmm", "aten::mm"))
    cached = load_from_disk(str(tmp_path / "bench" / "work" / "saelens-cache"))
    assert cached.column_names == ["transformer.h.1", "token_ids"]
    assert len(cached) == 16 and len(cached[0]["token_ids"]) == 15


def test_collect_is_measured_against_hf_itself_where_the_model_has_a_checkpoint(tmp_path, tiny_llama_dir):
    result = bench.run_bench(
        tiny_collect_bench(tmp_path, tiny_llama_dir[0], "blocks.1.hook_mlp_out", "collect_vs_forward")
    )
    assert result["collect_vs_forward"] > 0
    assert result["collect"]["forward"] == result["collect"]["collect_forward"] == "hf-sdpa"


def test_bench_refuses_unknown_keys_and_zero_rounds(tmp_path):
    from benchmarks.cli import main as harnesses

    expect_error(
        run("bench", "--out", str(tmp_path / "b"), "--only", "read_vs_memmap,warp_speed", cli=harnesses),
        "--only: unknown benchmark warp_speed",
    )
    expect_error(
        run("bench", "--out", str(tmp_path / "b"), "--rounds", "0", cli=harnesses), "--rounds must be at least 1"
    )
    assert not (tmp_path / "b").exists()  # refused before any work
