"""The soak benchmark runs end to end (briefly): training, two readers and an appender on one store."""

import json

from benchmarks.soak import SoakConfig, run_soak
from store_schema.reader import open_store


def test_a_short_soak_finds_the_store_consistent(tmp_path):
    cfg = SoakConfig(out=str(tmp_path), seconds=4, tokens=8_000, append_tokens=1_000, batch_size=256)
    report = run_soak(cfg)
    assert report["consistent"], json.dumps(report, indent=2)
    appender, final = report["appender"], report["final_store"]
    # the appender's last target: the collected budget grown by append_tokens per append (the killed one too)
    assert appender["appends"] >= 1 and appender["tokens"] == cfg.tokens + appender["appends"] * cfg.append_tokens
    store = open_store(tmp_path / "store.zarr")
    assert final["complete"] and final["train_rows"] == store.n_rows("train")
    # the verification covered at least every chunk of the training rows
    assert final["chunks_verified"] >= -(-final["train_rows"] // store.chunk_rows) and not final["damaged"]
    assert len(report["readers"]) == cfg.readers
    for r in report["readers"]:
        assert r["opens"] > 0 and 0 < r["rows_read"] <= 16 * store.chunk_rows * r["opens"]  # 16 chunks an open
        assert 0 < r["max_rows_seen"] <= final["train_rows"] and not r["problems"]
    assert report["train_alone_tokens_per_s"] > 0 and report["train_under_load_tokens_per_s"] > 0
    assert json.loads((tmp_path / "soak.json").read_text()) == report
