"""The benchmark harness: sides alternate, FLOPs are counted as documented, and a tiny run of every
benchmark writes the keys, the raw timings behind them and sane values."""

import json
import statistics

import pytest
import torch

from benchmarks import bench
from tests.helpers.cli import expect_error, run


def test_sides_alternate_round_by_round():
    calls = []
    rates = bench.alternate({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b"] * 3
    assert rates == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert bench.ratio({"a": [1.0, 9.0, 3.0], "b": [2.0, 2.0, 2.0]}, "a", "b") == pytest.approx(1.5)  # medians


def explicit_topk_step_flops(batch: int, d_in: int, width: int, k: int) -> int:
    """torch's own count (FlopCounterMode) of the matmuls of a TopK step written out densely: the encoder
    x @ W_enc and its weight gradient, and the decoder as a batched product of each token's k codes with
    its k gathered decoder rows, with its gradients for the codes and for the rows (the input needs none)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen)
    W_enc = torch.randn(d_in, width, generator=gen, requires_grad=True)
    W_dec = torch.randn(width, d_in, generator=gen, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        values, indices = (x @ W_enc).topk(k, dim=-1)
        x_hat = torch.bmm(values.unsqueeze(1), W_dec[indices]).squeeze(1)
        (x_hat - x).pow(2).sum().backward()
    assert W_enc.grad is not None and W_dec.grad is not None
    return counter.get_total_flops()


@pytest.mark.parametrize("batch, d_in, width, k", [(1, 1, 1, 1), (10, 3, 7, 2), (64, 16, 128, 4), (5, 8, 32, 32)])
def test_topk_step_flops_are_those_of_the_steps_matmuls_written_out(batch, d_in, width, k):
    assert bench.topk_step_flops(batch=batch, d_in=d_in, width=width, k=k) == explicit_topk_step_flops(
        batch, d_in, width, k
    )
    # and, as a step's work is per row, twice the batch is twice the FLOPs
    assert bench.topk_step_flops(2 * batch, d_in, width, k) == 2 * bench.topk_step_flops(batch, d_in, width, k)


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
        ceiling_tokens=8 * 1023,
        only=",".join(k for k in bench.KEYS if k != "collect_vs_saelens"),
        progress=False,
    )
    result = bench.run_bench(cfg)
    assert json.loads((tmp_path / "bench" / "bench.json").read_text()) == result
    assert result["sizes"] == {"d_in": 32, "width": 256, "k": 4, "batch_size": 256, "rounds": 1}
    # every ratio is the ratio of the medians of the raw rates written beside it, each side measured once
    # a round: (key, its raw figures, top side, bottom side)
    sparsify = result["sparsify"]
    for key, raw, top, bottom in (
        ("read_vs_memmap", result["read"], "store_tokens_per_s", "memmap_tokens_per_s"),
        ("api_read_vs_loader", result["api_read"], "api_tokens_per_s", "loader_tokens_per_s"),
        ("two_hooks_read_vs_one", result["two_hooks_read"], "two_hooks_bytes_per_s", "one_hook_bytes_per_s"),
        ("train_vs_saelens", result["train"], "ours_tokens_per_s", "saelens_tokens_per_s"),
        ("train_vs_sparsify", sparsify["width_256"], "ours_tokens_per_s", "sparsify_tokens_per_s"),
        ("train_vs_sparsify_16k", sparsify["width_512"], "ours_tokens_per_s", "sparsify_tokens_per_s"),
        ("mp_vs_saelens", result["mp"], "ours_tokens_per_s", "saelens_tokens_per_s"),
        ("collect_vs_forward", result["collect"], "collect_tokens_per_s", "forward_tokens_per_s"),
        ("collect_ceiling_vs_disk", result["collect_ceiling"], "one_hook_bytes_per_s", "disk_bytes_per_s"),
        ("collect_ceiling_multi_hook", result["collect_ceiling"], "multi_hook_bytes_per_s", "one_hook_bytes_per_s"),
        ("store_write_vs_disk", result["collect_ceiling"], "writer_bytes_per_s", "disk_bytes_per_s"),
    ):
        assert len(raw[top]) == len(raw[bottom]) == cfg.rounds, key
        assert min(raw[top] + raw[bottom]) > 0, key
        assert result[key] == pytest.approx(ratio_of_medians(raw, top, bottom)), key
    # the roofline: the step's counted FLOPs at our median step rate, over the dense matmul rate
    train = result["train"]
    assert train["step_flops"] == bench.topk_step_flops(cfg.batch_size, cfg.d_in, cfg.width, cfg.k)
    assert train["ours_it_per_s"] == pytest.approx(statistics.median(train["ours_tokens_per_s"]) / cfg.batch_size)
    assert train["achieved_flop_per_s"] == pytest.approx(train["ours_it_per_s"] * train["step_flops"])
    assert result["train_roofline_fraction"] == pytest.approx(train["achieved_flop_per_s"] / train["matmul_flop_per_s"])
    # fsync's cost: the no-fsync side's ratio to the forward, minus collect_vs_forward, from the same rounds
    collect = result["collect"]
    assert len(collect["collect_no_fsync_tokens_per_s"]) == cfg.rounds
    no_fsync = ratio_of_medians(collect, "collect_no_fsync_tokens_per_s", "forward_tokens_per_s")
    assert result["fsync_cost"] == pytest.approx(no_fsync - result["collect_vs_forward"])
    assert collect["forward"] == collect["collect_forward"] == "transformer-bridge"  # tiny-random is no HF model
    assert (collect["contexts"], collect["context_size"], collect["batch_size"]) == (16, 16, 4)
    assert result["read"]["rows"] == cfg.read_rows and result["read"]["bytes"] == cfg.read_rows * cfg.d_in * 2
    assert result["mp"]["reconstruction_max_rel_diff"] < 1e-3
    assert sparsify["decoder"] == "eager_decode"
    stream = result["stream"]
    assert stream["store_bytes"] == 4 * stream["buffer_bytes"]
    assert 0 < stream["peak_rss_bytes"] < 8e9
    assert result["stream_peak_rss_gb"] == pytest.approx(stream["peak_rss_bytes"] / 1e9)
    assert stream["limit_gb"] == pytest.approx(stream["buffer_bytes"] / 1e9 + 1)
    # the null-model ceiling: tokens/s at d 576 are its bytes/s over 576 fp16 values a token
    ceiling = result["collect_ceiling"]
    assert result["collect_ceiling_tokens_per_s_d576"] == pytest.approx(
        statistics.median(ceiling["one_hook_bytes_per_s"]) / (576 * 2)
    )
    assert result["collect_ceiling_tokens_per_s_d2304"] > 0 and len(ceiling["multi_hooks"]) == 8
    assert ceiling["context_size"] == 1024 and ceiling["block_bytes"] % ceiling["chunk_bytes"] == 0
    table = bench.format_bench_table(result)
    assert "| read_vs_memmap |" in table and "| collect_ceiling_tokens_per_s_d576 |" in table and "| report |" in table


def ratio_of_medians(raw: dict, top: str, bottom: str) -> float:
    """What a ratio key must be: the median of the top side's rounds over the median of the bottom's."""
    return statistics.median(raw[top]) / statistics.median(raw[bottom])


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
    raw = result["collect_saelens"]
    assert len(raw["collect_tokens_per_s"]) == len(raw["saelens_tokens_per_s"]) == 1  # rounds
    assert result["collect_vs_saelens"] == pytest.approx(
        ratio_of_medians(raw, "collect_tokens_per_s", "saelens_tokens_per_s")
    )
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
    raw = result["collect"]
    assert len(raw["collect_tokens_per_s"]) == len(raw["forward_tokens_per_s"]) == 1  # rounds
    assert result["collect_vs_forward"] == pytest.approx(
        ratio_of_medians(raw, "collect_tokens_per_s", "forward_tokens_per_s")
    )
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
