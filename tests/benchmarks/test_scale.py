"""`python -m benchmarks scale` at tiny sizes: every part runs through its real code path and writes its keys beside
the raw figures they come from, and the scratch stores are gone afterwards."""

import json
import statistics

import pytest

from benchmarks import bench
from benchmarks.cli import main as harnesses
from benchmarks.scale import ScaleConfig, format_scale_table, run_scale
from stages.basics.errors import SaepipeError
from tests.helpers.cli import expect_error, run
from tests.helpers.s3 import TINY_S3_MEASUREMENT


@pytest.fixture(scope="module")
def tiny_scale(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    cfg = ScaleConfig(
        out=out,
        collect_tokens=(20_000, 200_000),
        big_store_gb=0.08,
        model="tiny-random",
        collect_hook="blocks.1.hook_resid_post",
        s3_latency_ms=20,
        progress=False,
        train_steps=6,
        fsync_contexts=16,
        s3_options=TINY_S3_MEASUREMENT,
    )
    return out, run_scale(cfg)


def test_every_part_writes_its_keys_and_raw_figures(tiny_scale):
    out, result = tiny_scale
    assert json.loads((out / "scale.json").read_text()) == result
    assert not (out / "work").exists()  # scratch removed
    collect = result["collect"]
    assert collect["small"]["tokens"] == 20_000 and collect["large"]["tokens"] == 200_000
    assert result["collect_rss_ratio"] == pytest.approx(
        collect["large"]["peak_rss_bytes"] / collect["small"]["peak_rss_bytes"]
    )
    assert result["collect_commit_ratio"] == pytest.approx(
        collect["large"]["commit_s_last_tenth_median"] / collect["large"]["commit_s_first_tenth_median"]
    )
    assert collect["large"]["train_blocks"] > collect["small"]["train_blocks"] >= 1
    assert 0 < result["root_metadata_bytes"] <= 65_536
    big = result["big_store"]
    assert result["big_store_gb"] == pytest.approx(big["store_bytes"] / 1e9) and big["store_bytes"] > 0.07e9
    assert big["disk_bytes"] >= big["loader_bytes"] > 0  # the loader skips only a last partial batch
    # one epoch of whole batches: the store's rows are whole chunks, and a chunk holds whole batches
    batch_size = big["train"]["batch_size"]
    assert big["loader_batches"] == big["rows"] // batch_size
    assert big["loader_bytes"] == big["loader_batches"] * batch_size * big["d"] * 2
    assert big["disk_bytes_per_s"] == pytest.approx(big["disk_bytes"] / big["disk_seconds"])
    assert big["loader_bytes_per_s"] == pytest.approx(big["loader_bytes"] / big["loader_seconds"])
    assert result["big_store_read_vs_disk"] == pytest.approx(big["loader_bytes_per_s"] / big["disk_bytes_per_s"])
    assert result["big_store_peak_rss_gb"] == pytest.approx(big["peak_rss_bytes"] / 1e9)
    train = big["train"]
    assert train["steps"] == 6
    assert result["big_store_train_vs_resident"] == pytest.approx(
        train["streamed_it_per_s"] / train["resident_it_per_s"]
    )
    assert big["peak_rss_limit_gb"] == pytest.approx(big["buffer_bytes"] / 1e9 + 1)
    # fsync: the bench's collect at the configured contexts, each side measured the bench's rounds
    fsync = result["fsync"]
    assert fsync["model"] == "tiny-random" and fsync["contexts"] == 16
    rounds = bench.BenchConfig().rounds
    for side in ("collect_tokens_per_s", "collect_no_fsync_tokens_per_s", "forward_tokens_per_s"):
        assert len(fsync[side]) == rounds, side
    assert fsync["collect_vs_forward"] == pytest.approx(
        statistics.median(fsync["collect_tokens_per_s"]) / statistics.median(fsync["forward_tokens_per_s"])
    )
    no_fsync = statistics.median(fsync["collect_no_fsync_tokens_per_s"]) / statistics.median(
        fsync["forward_tokens_per_s"]
    )
    assert result["fsync_cost"] == pytest.approx(no_fsync - fsync["collect_vs_forward"])
    # s3: each ratio is the median of its rounds' ratios, each side measured once a round
    assert result["s3_latency_ms"] == pytest.approx(20)
    assert result["s3_store"]["chunks"] == result["s3_read"]["chunks"] == 12
    assert result["s3_read"]["shard_objects"] == 1  # 12 chunks, in a shard of up to 16
    for key, raw, top, bottom in (
        ("s3_read_vs_raw_get", result["s3_read"], "loader_bytes_per_s", "raw_get_bytes_per_s"),
        ("s3_train_vs_local", result["s3_train"], "s3_steps_per_s", "local_steps_per_s"),
        ("s3_collect_vs_raw_put", result["s3_collect"], "collect_bytes_per_s", "raw_put_bytes_per_s"),
    ):
        assert len(raw[top]) == len(raw[bottom]) == 2, key
        assert raw["round_ratios"] == pytest.approx([a / b for a, b in zip(raw[top], raw[bottom])]), key
        assert result[key] == pytest.approx(statistics.median(raw["round_ratios"])), key
        assert raw[f"{top}_median"] == pytest.approx(statistics.median(raw[top])), key
    # the raw side PUT the files of a local collect of the same configuration
    assert result["s3_collect"]["tokens"] == 8192 and result["s3_collect"]["files"] > 10
    table = format_scale_table(result)
    assert "| collect_rss_ratio |" in table and "| big_store_peak_rss_gb |" in table


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(SaepipeError, match="unknown part colect"):
        run_scale(ScaleConfig(out=tmp_path, only="colect"))
    expect_error(
        run("scale", "--out", tmp_path, "--collect-tokens", "100,10", cli=harnesses), "two sizes, smaller first"
    )
    assert not (tmp_path / "scale.json").exists()
