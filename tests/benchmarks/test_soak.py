"""The soak benchmark runs end to end (briefly): training, two readers and an appender on one store."""

import json

from benchmarks.soak import SoakConfig, run_soak


def test_a_short_soak_finds_the_store_consistent(tmp_path):
    report = run_soak(SoakConfig(out=str(tmp_path), seconds=4, tokens=8_000, append_tokens=1_000, batch_size=256))
    assert report["consistent"], json.dumps(report, indent=2)
    assert report["appender"]["appends"] >= 1 and report["final_store"]["complete"]
    assert report["final_store"]["chunks_verified"] > 0 and not report["final_store"]["damaged"]
    assert all(r["opens"] > 0 and r["rows_read"] > 0 and not r["problems"] for r in report["readers"])
    assert report["train_alone_tokens_per_s"] > 0 and report["train_under_load_tokens_per_s"] > 0
    assert json.loads((tmp_path / "soak.json").read_text()) == report
