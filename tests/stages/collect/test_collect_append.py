"""collect --append: a complete store grows without a committed byte of it changing, readers see the old
store until the append is done, an interrupted append resumes bit-identical, and bad requests are named."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.basics.errors import SaepipeError
from stages.collect import plan_action, run_collect
from stages.collect.config import CollectConfig
from store_schema.generated import write_array_store
from store_schema.header import Append, StoreHeader
from store_schema.reader import open_store
from store_schema.schema import split_counts
from store_schema.writer import StoreWriter
from tests.helpers.cli import run
from tests.helpers.collect import HOOKS, SETTINGS
from tests.helpers.files import tree_bytes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A small local corpus that holds about 1,670 contexts of 32 tokens (the byte-level tokenizer: one token
    per byte), collected with SETTINGS: 20-context blocks and 256-row chunks (blocks straddle chunks)."""
    folder = tmp_path_factory.mktemp("corpus")
    words = np.array("the a of store rows chunk model token layer train eval block append shuffle norm".split())
    rng = np.random.default_rng(0)
    for i in range(48):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 200)))
    return str(folder / "*.txt")


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus) -> Path:
    """A complete store of 3,000 training tokens."""
    out = tmp_path_factory.mktemp("base") / "s.zarr"
    run_collect(CollectConfig(out=str(out), dataset=corpus, tokens=3000, **SETTINGS))
    return out


def copy_of(base: Path, tmp_path: Path, name: str = "s.zarr") -> Path:
    shutil.copytree(base, tmp_path / name)
    return tmp_path / name


def rows_of(store) -> dict:
    """Every committed row of every array, and the contexts, as numpy arrays."""
    out = {"tokens": store.tokens[:][: len(store.context_split)], "context_split": store.context_split}
    for split in ("train", "eval"):
        out[f"{split}/mapping"] = np.stack(store.read_mapping(split))
        for hook in HOOKS:
            out[f"{split}/{hook}"] = store.read_rows(split, hook)
    return out


def whole_chunks_below(store_path: Path, header: StoreHeader) -> dict[str, bytes]:
    """The files (chunks, or shards of chunks) of the row arrays that hold committed rows only."""
    files, chunk = {}, header.shard_rows or header.chunk_rows
    for split in ("train", "eval"):
        full = header.rows_committed(split) // chunk
        for path in (store_path / split).rglob("c/*"):
            if path.is_file() and int(path.name) < full:
                files[str(path.relative_to(store_path))] = path.read_bytes()
            elif path.is_dir() and int(path.name) < full:  # acts/row_stats: c/<row chunk>/0
                files.update({str(p.relative_to(store_path)): p.read_bytes() for p in path.iterdir()})
    return files


def test_an_append_grows_the_store_and_leaves_every_committed_byte_as_it_was(base, corpus, tmp_path):
    from stages.host_model.loading import load_host_model
    from stages.host_model.model import run_to_hooks

    path = copy_of(base, tmp_path)
    before = open_store(path)
    old, old_chunks = rows_of(before), whole_chunks_below(path, before.header)
    norm_files = {k: v for k, v in tree_bytes(path).items() if k.startswith("normalization/")}
    assert len(old_chunks) >= 8 and norm_files  # two whole shards of each row array

    result = run("collect", "--append", path, "--tokens", 6000, "--no-progress")
    assert result.exit_code == 0, result.output

    after = open_store(path)
    assert after.complete and after.header.token_budget == 6000 and after.n_rows("train") >= 5000
    assert after.header.appends == (
        Append(tokens=6000, contexts=(len(old["tokens"]), len(after.context_split)), writer=after.header.writer),
    )
    new = rows_of(after)
    for key, value in old.items():  # every committed row, token and split: the same values, the same place
        np.testing.assert_array_equal(
            new[key][..., : value.shape[-1]] if key.endswith("mapping") else new[key][: len(value)], value, err_msg=key
        )
    assert {k: v for k, v in whole_chunks_below(path, before.header).items()} == old_chunks  # files not rewritten
    assert {k: v for k, v in tree_bytes(path).items() if k.startswith("normalization/")} == norm_files
    assert after.header.records("normalization") == before.header.records("normalization")
    assert after.fingerprint != before.fingerprint  # a run checkpointed on the old rows refuses to resume

    # The new rows come from the new contexts only, with the appended contexts' split, and they are the
    # model's activations normalized with the store's recorded normalization.
    n_old = len(old["tokens"])
    appended = {split: new[f"{split}/mapping"][:, old[f"{split}/mapping"].shape[1] :] for split in ("train", "eval")}
    assert all((m[0] >= n_old).all() and len(m[0]) for m in appended.values())
    assert (after.context_split[appended["eval"][0]] == 1).all() and (
        after.context_split[appended["train"][0]] == 0
    ).all()
    added_split = after.context_split[n_old:]
    assert 0 < added_split.sum() < 0.2 * len(added_split)
    model = load_host_model("tiny-random")
    picks = np.random.default_rng(1).choice(appended["train"].shape[1], 8, replace=False)
    contexts, positions = appended["train"][0][picks], appended["train"][1][picks]
    first_new = old["train/mapping"].shape[1]
    raw = run_to_hooks(model, torch.from_numpy(after.tokens.oindex[contexts.tolist(), :].astype(np.int64)), [HOOKS[1]])[
        HOOKS[1]
    ]
    expected = after.normalization(HOOKS[1]).apply(raw[torch.arange(8), torch.from_numpy(positions.astype(np.int64))])[
        0
    ]
    np.testing.assert_array_equal(new[f"train/{HOOKS[1]}"][first_new + picks], expected.numpy().astype(np.float16))
    stats = after.running_stats("train", HOOKS[0])
    assert stats.count == after.n_rows("train")

    again = run("collect", "--append", path, "--tokens", 6000, "--no-progress")
    assert again.exit_code == 0 and "already holds 6,000 tokens" in again.output
    # not the store a collect of 3,000 or of 6,000 tokens writes, whose --out it must not pass for
    for tokens, differing in ((3000, ""), (6000, "tokens, ")):
        with pytest.raises(SaepipeError, match=rf"differs in: {differing}grown by --append to 6,000 tokens"):
            plan_action(CollectConfig(out=str(path), dataset=corpus, tokens=tokens, **SETTINGS))

    trained = run(
        "train",
        path,
        "--hook",
        HOOKS[0],
        "--width",
        64,
        "--k",
        4,
        "--tokens",
        4096,
        "--batch-size",
        512,
        "--out",
        tmp_path / "run",
        "--no-progress",
    )
    assert trained.exit_code == 0, trained.output
    recorded = json.loads((tmp_path / "run" / "cfg.json").read_text())["store"]["fingerprint"]
    assert recorded == after.fingerprint


def test_an_interrupted_append_resumes_bit_identical_while_readers_see_the_old_store(base, tmp_path, monkeypatch):
    whole, cut = copy_of(base, tmp_path, "whole.zarr"), copy_of(base, tmp_path, "cut.zarr")
    run_collect(CollectConfig(out=str(whole), tokens=6000, append=True, progress=False))

    before = open_store(cut)
    old = rows_of(before)
    real, commits = StoreWriter.commit_blocks, []

    def commit_blocks(self, split, blocks, *args):
        if len(commits) == 3:
            raise KeyboardInterrupt
        real(self, split, blocks, *args)
        commits.append(len(blocks))

    monkeypatch.setattr(StoreWriter, "commit_blocks", commit_blocks)
    with pytest.raises(KeyboardInterrupt):
        run_collect(CollectConfig(out=str(cut), tokens=6000, append=True, progress=False))
    monkeypatch.setattr(StoreWriter, "commit_blocks", real)

    during = open_store(cut)  # the append has made 3 commits and grown the arrays: readers see none of it
    assert (
        during.header.to_attrs()["append"]["progress"]["train"]["blocks_done"]  # the append's own progress
        == before.header.progress["train"].blocks_done + sum(commits)
    )
    assert during.complete and during.fingerprint == before.fingerprint
    assert during.n_rows("train") == before.n_rows("train") and during.tokens.shape[0] > len(old["tokens"])
    for key, value in rows_of(during).items():
        np.testing.assert_array_equal(value, old[key], err_msg=key)
    np.testing.assert_array_equal(during.contexts("eval"), before.contexts("eval"))
    with pytest.raises(SaepipeError, match="to 6,000 tokens was interrupted: finish it first with --tokens 6000"):
        run_collect(CollectConfig(out=str(cut), tokens=9000, append=True, progress=False))

    run_collect(CollectConfig(out=str(cut), tokens=6000, append=True, progress=False))
    assert tree_bytes(cut) == tree_bytes(whole)


def test_bad_appends_are_refused_in_one_line_and_change_nothing(base, corpus, tmp_path, monkeypatch):
    path = copy_of(base, tmp_path)
    untouched = tree_bytes(path)

    def refused(*args, match):
        result = run("collect", *args, "--no-progress")
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and match in result.output, result.output

    refused("--append", path, "--tokens", 2000, match="--tokens 2,000 is fewer than the 3,000 tokens store")
    refused("--append", path, "--tokens", 3005, match="already has room for 3,007 training tokens")
    # The corpus: its bytes (one token each) joined by separators fill this many contexts of 31 text tokens.
    available = (sum(len(p.read_bytes()) for p in Path(corpus).parent.glob("*.txt")) + 47) // 31
    most = (97 + split_counts(available - 108, 0.1)[0]) * 31  # 97 training contexts of 108 now
    refused(
        "--append",
        path,
        "--tokens",
        60000,
        match=f"holds {available:,} contexts of 32 tokens, the store uses 108 and the append needs 2,044 more: "
        f"--tokens can be at most {most:,} for this store",
    )
    refused(
        "--append",
        path,
        "--tokens",
        6000,
        "--hook",
        HOOKS[0],
        "--seed",
        3,
        match="grows the store with the settings it was collected with: drop --hook, --seed",
    )
    refused("--append", path, "--tokens", 6000, "--out", tmp_path / "other.zarr", match="drop --out")
    refused("--append", path, match="--append needs --tokens N")
    refused("--append", tmp_path / "nothing.zarr", "--tokens", 6000, match="no store at")
    rng = np.random.default_rng(0)
    write_array_store(
        tmp_path / "synthetic.zarr", rng.standard_normal((300, 8)), rng.standard_normal((30, 8)), hook="h"
    )
    refused("--append", tmp_path / "synthetic.zarr", "--tokens", 6000, match="was not written by `saepipe collect`")
    changed = Path(shutil.copytree(Path(corpus).parent, tmp_path / "changed"))
    small = tmp_path / "small.zarr"
    run_collect(CollectConfig(out=str(small), dataset=str(changed / "*.txt"), tokens=600, **SETTINGS))
    first = changed / "doc00.txt"
    first.write_text("an edited first document " + first.read_text())
    refused(
        "--append",
        small,
        "--tokens",
        1200,
        match=f"the text source {changed}/*.txt no longer packs into the store's contexts",
    )

    missing = run("collect", "--tokens", 6000)
    assert (
        missing.exit_code == 2
        and "Missing option '--out'. Or grow a complete store with --append STORE." in missing.output
    )
    assert tree_bytes(path) == untouched

    real = StoreWriter.commit_blocks

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "commit_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_collect(CollectConfig(out=str(tmp_path / "partial.zarr"), dataset=corpus, tokens=3000, **SETTINGS))
    monkeypatch.setattr(StoreWriter, "commit_blocks", real)
    refused("--append", tmp_path / "partial.zarr", "--tokens", 6000, match="is incomplete: finish it first")
