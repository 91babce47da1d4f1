"""Fixtures shared by the SAE recipe tests."""

import pytest

from stages.synthetic import PlantedFeatures, write_array_store


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A complete store of 64-d rows built from 256 planted features (120k train, 4k eval rows), and
    the features: every architecture's recovery test trains on it through the real loop."""
    features = PlantedFeatures.make(64, 256, seed=0)
    path = tmp_path_factory.mktemp("planted") / "store.zarr"
    write_array_store(path, features.sample(120_000, seed=1), features.sample(4096, seed=2), hook="synthetic")
    return features, path
