"""Fixtures of the SAE tests."""

import pytest
import torch

from tests.helpers.planted import planted_store


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A complete store of 64-d rows built from 256 planted features (120k train, 4k eval rows), and
    the features: every architecture's recovery test trains on it through the real loop."""
    return planted_store(tmp_path_factory.mktemp("planted") / "store.zarr", 120_000, 4096)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`). The
    training tests run on CPUs shared with other work, and their small matmuls gain little from a second
    thread: with one, a busy core slows them down instead of stalling every parallel region (measured:
    12 s with one thread, 35-120 s with two while another process kept a core busy; 68 s instead of 4 s
    for one ReLU training run under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
