"""Fixtures of the store tests."""

import pytest

from tests.helpers.cli import collect_args, run_ok


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A complete store of the tiny random model (`collect_args(4000)`: 4,000 training tokens at
    tests.helpers.cli.HOOK, 512-row chunks). Tests read it, and copy it before they change anything."""
    path = tmp_path_factory.mktemp("tiny-store") / "s.zarr"
    run_ok(*collect_args(4000), "--out", path)
    return path
