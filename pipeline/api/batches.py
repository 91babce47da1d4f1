"""Shuffled batches of a store for code outside saepipe: an iterator for a training loop of one's own, and
a torch IterableDataset for a DataLoader. Both are the loader `saepipe train` reads with
(store_schema.loader.ShuffledBatches), so they read as fast and shuffle the same way."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from stages.basics.device import resolve_device
from store_schema.loader import ShuffledBatches
from store_schema.reader import ActivationStore
from store_schema.schema import StoreError


def _check_raw(store: ActivationStore, hook: str) -> None:
    store.require_hook(hook)
    if store.normalization(hook).has_row_stats:
        raise StoreError(
            f"store {store.location} normalizes '{hook}' per token (mode token), and shuffled batches do not "
            f"carry each row's (mean, scale): read raw rows with Store.rows(..., raw=True), or take normalized batches"
        )


class Batches:
    """Endless shuffled batches of one hook (Store.batches). Iterate it, or call ``take(n)``."""

    def __init__(
        self,
        store: ActivationStore,
        hook: str,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        start: int = 0,
        raw: bool = False,
        split: str = "train",
        resident: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if raw:
            _check_raw(store, hook)
        if start < 0:
            raise ValueError(f"start is a batch number, {start} is negative")
        self.hook, self.start, self.dtype = hook, int(start), dtype
        # The loader hands out fp16 rows converted on the device; raw rows are inverted in float32 first.
        self._loader = ShuffledBatches(
            store, hook, batch_size * world_size, device=resolve_device(str(device)),
            dtype=torch.float32 if raw else dtype, seed=seed, split=split, resident=resident,
            rank=rank, world_size=world_size,
        )  # fmt: skip
        self._normalization = store.normalization(hook) if raw else None

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one pass over the split (streaming drops each window's rows that fill no whole batch)."""
        return self._loader.batches_per_epoch

    @property
    def resident(self) -> bool:
        """True when the whole split was small enough to hold in memory (read once, then permuted)."""
        return self._loader.resident

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self._loader.batches(self.start):
            if self._normalization is not None:
                batch = self._normalization.invert(batch).to(self.dtype)
            yield batch

    def take(self, n: int) -> Iterator[torch.Tensor]:
        """The next `n` batches from `start`, then stop."""
        for i, batch in enumerate(self):
            if i >= n:
                return
            yield batch


def _ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's when it is initialized, else torchrun's
    RANK/WORLD_SIZE, else (0, 1). Taken when the dataset is made: a DataLoader worker cannot ask
    torch.distributed (its process group is its parent's)."""
    if rank is not None or world_size is not None:
        rank, world_size = int(rank or 0), int(world_size or 1)
    elif dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
    return rank, world_size


class ActivationDataset(IterableDataset):
    """Batches of one hook as a torch IterableDataset (Store.dataset): use ``DataLoader(ds, batch_size=None,
    num_workers=W)``. Each item is a CPU batch [batch_size, d_model].

    Ranks: torch.distributed's when it is initialized before the dataset is made, else torchrun's
    RANK/WORLD_SIZE, or pass `rank` and `world_size`. With R ranks and W workers per rank, the R·W readers share each global batch of
    R·W·batch_size rows, reader `rank·W + worker` taking its own slice: together they see every row of an
    epoch once, as one reader with the global batch would. An epoch is `n_batches` batches per reader
    (default: the readers' pass over the split); ``set_epoch(e)`` moves to epoch e, and `start` (a batch
    number) resumes mid-way, as DistributedSampler does. The store is opened in each worker, never
    pickled; streaming (not resident) by default, so W workers do not hold W copies of the split."""

    def __init__(
        self,
        location: str,
        hook: str,
        batch_size: int,
        *,
        seed: int = 0,
        n_batches: int | None = None,
        start: int = 0,
        raw: bool = False,
        split: str = "train",
        dtype: torch.dtype = torch.float32,
        resident: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.rank, self.world_size = _ranks(rank, world_size)
        self.location, self.hook, self.batch_size, self.seed = location, hook, int(batch_size), seed
        self.n_batches, self.start, self.raw, self.split = n_batches, int(start), raw, split
        self.dtype, self.resident, self.epoch = dtype, resident, 0
        store = ActivationStore.open(location)  # fail here, in the caller's process, on a bad store or hook
        if raw:
            _check_raw(store, hook)
        store.require_hook(hook)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self, reader: int, readers: int) -> Batches:
        store = ActivationStore.open(self.location)
        return Batches(
            store, self.hook, self.batch_size, device="cpu", dtype=self.dtype, seed=self.seed, raw=self.raw,
            split=self.split, resident=self.resident, rank=reader, world_size=readers,
        )  # fmt: skip

    def _reader(self) -> tuple[int, int]:
        """(this reader's index, readers in all): one per DataLoader worker of each rank."""
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        return self.rank * workers + worker_id, self.world_size * workers

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = self._batches(*self._reader())
        per_epoch = batches.batches_per_epoch if self.n_batches is None else self.n_batches
        batches.start = self.start + self.epoch * per_epoch
        yield from batches.take(per_epoch)
