"""The side-by-side comparison with SAELens runs end to end on planted features."""

import pytest

from pipeline.tools import quality
from stages.train.config import TrainConfig
from store_schema.writer import write_array_store
from tests.helpers.planted import PlantedFeatures

pytest.importorskip("sae_lens")


def test_topk_against_saelens_on_the_same_rows(tmp_path):
    features = PlantedFeatures.make(32, 128, seed=0)
    store = tmp_path / "s.zarr"
    write_array_store(store, features.sample(40_000, seed=1), features.sample(2048, seed=2), hook="synthetic")
    base = TrainConfig.from_flat(
        store=str(store),
        out=str(tmp_path / "q"),
        hook="synthetic",
        width=256,
        tokens=40_960,
        batch_size=512,
        progress=False,
    )
    rows = quality.compare_with_saelens(
        base, quality.QualityConfig(archs="topk", k=8, eval_tokens=2048, use_model=False)
    )
    assert [r["impl"].split()[0] for r in rows] == ["saepipe", "sae-lens"]
    for row in rows:
        assert row["l0"] == pytest.approx(8, abs=0.01)
        assert 0.5 < row["fve"] <= 1 and row["wall_s"] > 0
    table = (tmp_path / "q" / "quality.md").read_text()
    assert table.count("| topk |") == 2 and "ce_recovered" in table
