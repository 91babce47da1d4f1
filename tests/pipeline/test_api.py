"""The public Python API (pipeline.api): what a teammate's own code gets from a store and a run folder."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from pipeline import api as saepipe
from store_schema.generated import write_generated_store
from store_schema.loader import ShuffledBatches
from store_schema.reader import open_store as open_internal
from tests.helpers.cli import HOOK, collect_args, run_ok

N_TRAIN = 6000


def numbered_rows(split: str, start: int, stop: int) -> np.ndarray:
    """Row i holds i in its first two columns (i // 2048, i % 2048: exact in fp16), so a batch names its rows."""
    i = np.arange(start, stop)
    rows = np.zeros((stop - start, 8), np.float32)
    rows[:, 0], rows[:, 1] = i // 2048, i % 2048
    return rows


def row_ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0].long() * 2048 + batch[:, 1].long()).tolist()


@pytest.fixture(scope="module")
def numbered_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("numbered") / "n.zarr"
    return write_generated_store(path, {"train": N_TRAIN, "eval": 100}, 8, numbered_rows, chunk_rows=256)


@pytest.fixture(scope="module")
def trained_run(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("api-run") / "run"
    run_ok("train", tiny_store, "--width", "32", "--k", "4", "--tokens", "2048", "--batch-size", "256",
           "--no-progress", "--out", out)  # fmt: skip
    return out


# -- a store -----------------------------------------------------------------------------------------


def test_summary_names_what_the_store_holds(tiny_store):
    store = saepipe.open_store(tiny_store)
    text = repr(store)
    for fragment in (HOOK, "tiny-random", f"{store.n_rows('train'):,}", store.fingerprint, "center-scale"):
        assert fragment in text
    assert store.provenance["model"]["name"] == "tiny-random"
    store.provenance["model"]["name"] = "changed"  # a copy: the store's own header is untouched
    assert store.model_name == "tiny-random"


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda s: s.batches("blocks.9.nothing", 64), "hook 'blocks.9.nothing' is not in store"),
        (lambda s: s.rows(0, 4, split="test"), "unknown split 'test'"),
        (lambda s: s.batches(HOOK, 10**7), "fewer than one batch"),
    ],
)
def test_bad_requests_are_one_line_errors(tiny_store, call, fragment):
    with pytest.raises(saepipe.StoreError) as caught:
        call(saepipe.open_store(tiny_store))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_that_is_not_a_store_is_refused(tmp_path):
    with pytest.raises(saepipe.StoreError, match="no store at"):
        saepipe.open_store(tmp_path / "missing.zarr")


# -- batches -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resident", [True, False])
def test_batches_are_the_training_loaders_own(numbered_store, resident):
    ours = saepipe.open_store(numbered_store).batches("synthetic", 512, seed=3, resident=resident)
    loader = ShuffledBatches(
        open_internal(numbered_store), "synthetic", 512, device=torch.device("cpu"), seed=3, resident=resident
    )
    for a, b in zip(ours.take(12), loader.batches(0)):  # 12 batches: more than an epoch (11)
        assert torch.equal(a, b)


def test_start_resumes_the_sequence(numbered_store):
    store = saepipe.open_store(numbered_store)
    whole = [row_ids(b) for b in store.batches("synthetic", 512, seed=1, resident=False).take(8)]
    resumed = [row_ids(b) for b in store.batches("synthetic", 512, seed=1, resident=False, start=5).take(3)]
    assert resumed == whole[5:]
    other_seed = [row_ids(b) for b in store.batches("synthetic", 512, seed=2, resident=False).take(1)]
    assert other_seed[0] != whole[0]


def test_raw_batches_invert_the_recorded_normalization(tiny_store):
    store = saepipe.open_store(tiny_store)
    norm = store.normalization(HOOK)
    stored = next(iter(store.batches(HOOK, 256, seed=0)))
    raw = next(iter(store.batches(HOOK, 256, seed=0, raw=True)))
    assert torch.allclose(raw, norm.invert(stored), atol=1e-6)
    assert not torch.allclose(raw, stored, atol=1e-2)  # the store's normalization is not the identity


@pytest.fixture(scope="module")
def token_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("token-store") / "t.zarr"
    run_ok(*collect_args(2000), "--normalize", "token", "--out", path)
    return path


def test_raw_batches_of_a_per_token_store_are_refused_and_raw_rows_are_exact(token_store):
    store = saepipe.open_store(token_store)
    with pytest.raises(saepipe.StoreError, match=r"per token \(mode token\).*Store.rows\(\.\.\., raw=True\)"):
        store.batches(HOOK, 64, raw=True)
    internal = open_internal(token_store)
    stored = torch.from_numpy(internal.read_rows("train", HOOK, 10, 20)).float()
    stats = torch.from_numpy(internal.read_row_stats("train", HOOK, 10, 20))
    raw = store.rows(10, 20, hook=HOOK, raw=True).acts
    assert torch.allclose(raw, stored * stats[:, 1:2] + stats[:, 0:1])
    normalized, _ = store.normalization(HOOK).apply(raw)
    assert torch.allclose(normalized, stored, rtol=1e-3, atol=1e-3)  # stored rows are fp16


# -- the DataLoader dataset ----------------------------------------------------------------------------


def epoch_ids(dataset, workers: int) -> list[list[int]]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [row_ids(batch) for batch in loader]


def test_workers_share_each_epoch_without_overlap(numbered_store):
    store = saepipe.open_store(numbered_store)
    single = [i for b in store.batches("synthetic", 4 * 128, seed=5, resident=False).take(10) for i in row_ids(b)]
    per_worker = epoch_ids(store.dataset("synthetic", 128, seed=5, n_batches=5), workers=4)
    served = [i for batch in per_worker for i in batch]
    assert len(per_worker) == 4 * 5 and all(len(b) == 128 for b in per_worker)
    assert len(served) == len(set(served))  # no row twice
    assert sorted(served) == sorted(single[: len(served)])  # the rows one reader with the global batch reads


def test_epochs_and_start_move_through_the_sequence(numbered_store):
    store = saepipe.open_store(numbered_store)
    dataset = store.dataset("synthetic", 256, seed=0)
    first = epoch_ids(dataset, workers=0)
    dataset.set_epoch(1)
    second = epoch_ids(dataset, workers=0)
    assert len(first) == len(second) == store.batches("synthetic", 256, resident=False).batches_per_epoch
    assert first != second
    flat = [b for b in store.batches("synthetic", 256, seed=0, resident=False).take(2 * len(first))]
    assert first + second == [row_ids(b) for b in flat]


def _rank_reads(rank: int, world: int, path: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dataset = saepipe.open_store(path).dataset("synthetic", 64, seed=9, n_batches=6)
        np.save(f"{out}/rank{rank}.npy", np.asarray(epoch_ids(dataset, workers=2)))
    finally:
        dist.destroy_process_group()


def test_ranks_and_workers_together_read_each_row_once(numbered_store, tmp_path):
    from tests.helpers.s3 import free_port

    mp.spawn(_rank_reads, args=(2, str(numbered_store), free_port(), str(tmp_path)), nprocs=2)
    reads = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    assert all(r.shape == (2 * 6, 64) for r in reads)  # 2 workers x 6 batches of 64 rows on each rank
    served = np.concatenate([r.reshape(-1) for r in reads])
    assert len(np.unique(served)) == len(served)
    store = saepipe.open_store(numbered_store)
    single = [i for b in store.batches("synthetic", 4 * 64, seed=9, resident=False).take(6) for i in row_ids(b)]
    assert sorted(served.tolist()) == sorted(single)


# -- rows and tokens -----------------------------------------------------------------------------------


def test_rows_name_their_tokens(tiny_store):
    store = saepipe.open_store(tiny_store)
    internal = open_internal(tiny_store)
    rows = store.rows(100, 164, hook=HOOK)
    assert len(rows) == 64 and rows.acts.shape == (64, store.d_model)
    assert torch.equal(rows.acts, torch.from_numpy(internal.read_rows("train", HOOK, 100, 164)).float())
    tokens = np.asarray(internal.tokens[:])
    assert np.array_equal(rows.tokens, tokens[rows.context, rows.position])
    assert 0 not in set(rows.position.tolist())  # position 0 (the attention sink) is never stored
    # The tiny model's tokenizer is bytes: a row's token decodes to the character the snippet marks.
    ids, p = store.context_tokens(rows.context[0]), int(rows.position[0])
    expected = (
        f"{store.decode(ids[max(0, p - 12) : p])}⟦{store.decode(rows.tokens[:1])}⟧{store.decode(ids[p + 1 : p + 5])}"
    )
    assert store.snippet(rows.context[0], p) == expected
    with pytest.raises(IndexError, match="is not in the store"):
        store.context_tokens(10**6)


def test_rows_past_the_end_are_clipped_and_eval_rows_are_there(tiny_store):
    store = saepipe.open_store(tiny_store)
    n = store.n_rows("eval")
    rows = store.rows(n - 3, n + 100, hook=HOOK, split="eval")
    assert len(rows) == 3 and rows.split == "eval"
    assert len(store.rows(5, 5)) == 0 and store.rows(0, 4).acts is None


# -- a trained SAE ---------------------------------------------------------------------------------------


def test_a_run_reads_raw_activations(trained_run, tiny_store):
    sae = saepipe.load_run(trained_run)
    store = saepipe.open_store(tiny_store)
    raw = store.rows(0, 300, hook=HOOK, raw=True).acts
    stored = store.rows(0, 300, hook=HOOK).acts
    with torch.no_grad():
        latents = sae.encode(raw)
        inner = sae.sae.encode(stored).dense(sae.d_sae)  # the SAE on the rows as stored (normalized)
        assert torch.allclose(latents, inner, atol=1e-3)
        assert ((latents > 0).sum(-1) <= 4).all()  # k = 4
        reconstruction = sae(raw)
        assert torch.allclose(sae.decode(latents), reconstruction, atol=1e-5)
        assert torch.allclose(store.normalization(HOOK).apply(reconstruction)[0], sae.sae(stored), atol=1e-4)
        assert sae.encode(raw.reshape(3, 100, -1)).shape == (3, 100, sae.d_sae)  # any leading shape
    assert sae.hook == HOOK and sae.config["training"]["k"] == 4 and sae.eval_results is None
    with pytest.raises(ValueError, match="rows of width 64"):
        sae.encode(torch.zeros(2, 5))


def test_a_run_and_its_saelens_export_agree(trained_run, tiny_store):
    raw = saepipe.open_store(tiny_store).rows(0, 200, hook=HOOK, raw=True).acts
    ours, exported = saepipe.load_run(trained_run), saepipe.load_run(trained_run / "saelens")
    assert exported.hook == ours.hook and exported.arch == "saelens topk"
    with torch.no_grad():
        assert torch.allclose(exported.encode(raw), ours.encode(raw), atol=1e-3)
        assert torch.allclose(exported(raw), ours(raw), atol=1e-3)


def test_eval_results_come_with_the_run(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    run_ok("eval", run, "--no-model", "--tokens", "128", "--no-progress")
    assert saepipe.load_run(run).eval_results["fve"] == pytest.approx(
        __import__("json").loads((run / "eval.json").read_text())["fve"]
    )


def test_what_is_not_a_run_is_refused(tmp_path, trained_run):
    with pytest.raises(
        saepipe.SaepipeError, match=r"neither a saepipe run folder \(sae.safetensors\) nor a SAELens SAE folder"
    ):
        saepipe.load_run(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "cfg.json").write_text((trained_run / "cfg.json").read_text())
    (unfinished / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(saepipe.SaepipeError, match="the run did not finish"):
        saepipe.load_run(unfinished)


def test_a_store_on_s3_serves_the_same_batches_rows_and_dataset(tiny_store):
    pytest.importorskip("moto")
    from tests.helpers.s3 import moto_bucket

    with moto_bucket() as (bucket, _):
        url = f"{bucket}/shared/s.zarr"
        run_ok("store", "copy", tiny_store, url, "--no-progress")
        remote, local = saepipe.open_store(url), saepipe.open_store(tiny_store)
        assert remote.fingerprint == local.fingerprint and url in repr(remote)
        for a, b in zip(
            remote.batches(HOOK, 256, seed=4, resident=False).take(3), local.batches(HOOK, 256, seed=4, resident=False)
        ):
            assert torch.equal(a, b)
        assert torch.equal(remote.rows(7, 19, hook=HOOK, raw=True).acts, local.rows(7, 19, hook=HOOK, raw=True).acts)
        assert np.array_equal(remote.rows(7, 19).tokens, local.rows(7, 19).tokens)
        served = [row for batch in DataLoader(remote.dataset(HOOK, 128, n_batches=2), batch_size=None) for row in batch]
        assert len(served) == 256
