"""The API's arguments are checked: a bad batch size, start or row range is a StoreError saying what to
pass, never a hang, a ZeroDivisionError or a silently clipped answer."""

import pytest

from pipeline import api as saepipe
from store_schema.schema import StoreError
from tests.helpers.cli import HOOK


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True])
def test_batch_sizes_that_are_not_positive_whole_numbers_are_refused(tiny_store, batch_size):
    store = saepipe.open_store(tiny_store)
    for make in (store.batches, store.dataset):
        with pytest.raises(StoreError, match="batch_size must be a positive whole number of rows"):
            make(HOOK, batch_size)


def test_negative_starts_and_ranges_are_refused(tiny_store):
    store = saepipe.open_store(tiny_store)
    with pytest.raises(StoreError, match="start must be a batch index of at least 0"):
        store.batches(HOOK, 64, start=-1)
    with pytest.raises(StoreError, match="n_batches must be at least 0"):
        store.dataset(HOOK, 64, n_batches=-2)
    for start, stop in ((-5, 10), (5, 3)):
        with pytest.raises(StoreError, match=r"is not a range of rows: give 0 <= start <= stop"):
            store.rows(start, stop, hook=HOOK)
    assert len(store.rows(10, 10_000_000).context) == len(store.rows().context) - 10  # a stop past the end: clipped
