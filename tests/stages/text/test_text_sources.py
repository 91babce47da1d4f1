"""Tests for stages.text: python-docs, local files, HF names (offline) and context packing."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time

import numpy as np
import pytest

from stages.basics.errors import SaepipeError
from stages.text.packing import pack_contexts
from stages.text.sources import TextSource, open_text_source

BOS, SEP = 1000, 999


def encode_ints(text: str) -> list[int]:
    """A stand-in tokenizer: a document is a whitespace-separated list of token ids."""
    return [int(t) for t in text.split()]


def doc_of(tokens) -> str:
    return " ".join(str(t) for t in tokens)


def stream_of(docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        toks = encode_ints(d)
        if not toks:
            continue
        if out:
            out.append(SEP)
        out.extend(toks)
    return out


class CountingDocs:
    """An iterable that records how many documents were pulled from it."""

    def __init__(self, docs):
        self.docs = list(docs)
        self.pulled = 0

    def __iter__(self):
        for d in self.docs:
            self.pulled += 1
            yield d


# ------------------------------------------------------------------------------------------
# python-docs


@pytest.fixture(scope="module")
def python_docs() -> list[str]:
    return list(open_text_source("python-docs").documents())


def test_python_docs_source_record():
    src = open_text_source("python-docs")
    assert (src.name, src.kind, src.split, src.text_column, src.paths) == ("python-docs", "builtin", None, None, ())
    record = src.describe()
    assert json.loads(json.dumps(record)) == record
    assert record["python_version"] == sys.version
    assert {"name", "kind", "split", "text_column", "paths"} <= set(record)


def test_python_docs_is_large_and_starts_with_pydoc_topics(python_docs):
    from pydoc_data.topics import topics

    assert len(python_docs) > 300
    assert sum(map(len, python_docs)) > 1_000_000
    assert all(isinstance(d, str) and d for d in python_docs)
    expected = [topics[k] for k in sorted(topics) if topics[k].strip()]
    assert python_docs[: len(expected)] == expected
    assert any('The "if" statement is used for conditional execution' in d for d in python_docs)
    # stdlib docstrings, with definition headers
    json_doc = next(d for d in python_docs if d.startswith("module json\n"))
    assert "def dumps(obj," in json_doc
    assert any(d.startswith("module json.decoder\n") and "class JSONDecoder\n" in d for d in python_docs)


def test_python_docs_skips_tests_and_idle(python_docs):
    headers = [d.split("\n", 1)[0] for d in python_docs if d.startswith("module ")]
    assert not any(
        h.startswith(("module test.", "module idlelib", "module lib2to3", "module turtledemo")) for h in headers
    )


def test_python_docs_deterministic(python_docs):
    def digest(docs, n=200):
        h = hashlib.sha256()
        for d in itertools.islice(docs, n):
            h.update(d.encode())
            h.update(b"\0")
        return h.hexdigest()

    again = open_text_source("python-docs").documents()
    assert digest(again) == digest(iter(python_docs))


def test_python_docs_is_lazy_and_imports_nothing(capsys):
    watched = ["antigravity", "this", "tkinter", "turtle", "idlelib", "webbrowser"]
    before = {m for m in watched if m in sys.modules}
    docs = open_text_source("python-docs").documents()
    assert iter(docs) is docs  # a generator, not a list
    n = sum(1 for _ in docs)
    assert n > 300
    after = {m for m in watched if m in sys.modules}
    assert after == before
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    assert capsys.readouterr().out == ""  # `import this` would print the Zen


# ------------------------------------------------------------------------------------------
# pack_contexts


def test_pack_shapes_bos_and_exact_stream():
    rng = np.random.default_rng(0)
    docs = [doc_of(rng.integers(0, 500, size=int(n))) for n in rng.integers(1, 40, size=50)]
    ctx, n = 16, 20
    out = pack_contexts(
        docs, encode_ints, context_size=ctx, n_contexts=n, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert out.shape == (n, ctx) and out.dtype == np.int32
    assert (out[:, 0] == BOS).all()
    stream = stream_of(docs)
    assert out[:, 1:].ravel().tolist() == stream[: n * (ctx - 1)]


def test_pack_separators_and_doc_spanning_contexts():
    docs = [doc_of(range(1, 8)), doc_of([50, 51]), doc_of([60])]
    out = pack_contexts(
        docs, encode_ints, context_size=5, n_contexts=3, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert out.tolist() == [
        [BOS, 1, 2, 3, 4],
        [BOS, 5, 6, 7, SEP],  # doc0 runs on into the second context
        [BOS, 50, 51, SEP, 60],
    ]


def test_pack_skips_empty_documents():
    docs = ["", "1 2", "", "   ", "3", ""]  # "   " encodes to no tokens
    out = pack_contexts(
        docs, encode_ints, context_size=4, n_contexts=1, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert out.tolist() == [[BOS, 1, 2, SEP]]
    out = pack_contexts(
        docs, encode_ints, context_size=5, n_contexts=1, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert out.tolist() == [[BOS, 1, 2, SEP, 3]]


def test_pack_stops_pulling_documents_when_full():
    docs = CountingDocs(doc_of(range(10 * i, 10 * i + 10)) for i in range(1000))
    encoded = []

    def encode(text):
        encoded.append(text)
        return encode_ints(text)

    out = pack_contexts(
        docs, encode, context_size=5, n_contexts=2, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert out[:, 1:].ravel().tolist() == list(range(8))
    assert docs.pulled == 1 and len(encoded) == 1

    # last context filled exactly at the end of a document: the next one is not pulled
    docs = CountingDocs(doc_of([i, i, i]) for i in range(1000))
    out = pack_contexts(
        docs, encode_ints, context_size=4, n_contexts=1, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert out.tolist() == [[BOS, 0, 0, 0]]
    assert docs.pulled == 1

    docs = CountingDocs(doc_of([i, i, i]) for i in range(1000))
    pack_contexts(
        docs, encode_ints, context_size=4, n_contexts=3, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert docs.pulled == 3  # 3 + (1+3) + (1+3) = 11 >= 9 tokens


def test_pack_consumes_an_infinite_generator_lazily():
    def forever():
        for i in itertools.count():
            yield doc_of([i % 500] * 7)

    out = pack_contexts(
        forever(), encode_ints, context_size=8, n_contexts=4, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert out.shape == (4, 8)


def test_pack_too_little_text():
    docs = [doc_of([1, 2, 3]), doc_of([4, 5])]  # stream: 1 2 3 SEP 4 5 = 6 tokens
    with pytest.raises(SaepipeError) as info:
        pack_contexts(
            docs, encode_ints, context_size=3, n_contexts=5, bos_token_id=BOS, separator_token_id=SEP, progress=False
        )
    assert str(info.value) == (
        "the text source yields only 3 contexts of 3 tokens (6 tokens); ask for fewer tokens or use a larger dataset"
    )
    with pytest.raises(SaepipeError, match="yields only 0 contexts"):
        pack_contexts(
            [], encode_ints, context_size=3, n_contexts=1, bos_token_id=BOS, separator_token_id=SEP, progress=False
        )


def test_pack_edge_arguments():
    docs = CountingDocs(["1 2 3"])
    out = pack_contexts(
        docs, encode_ints, context_size=4, n_contexts=0, bos_token_id=BOS, separator_token_id=SEP, progress=False
    )
    assert out.shape == (0, 4) and docs.pulled == 0
    with pytest.raises(SaepipeError):
        pack_contexts(
            ["1 2"], encode_ints, context_size=1, n_contexts=1, bos_token_id=BOS, separator_token_id=SEP, progress=False
        )


def test_pack_progress_bar_goes_to_stderr(capsys):
    pack_contexts(["1 2 3 4 5 6"], encode_ints, context_size=3, n_contexts=2, bos_token_id=BOS, separator_token_id=SEP)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "ctx" in captured.err
    pack_contexts(
        ["1 2 3 4 5 6"],
        encode_ints,
        context_size=3,
        n_contexts=2,
        bos_token_id=BOS,
        separator_token_id=SEP,
        progress=False,
    )
    assert capsys.readouterr().err == ""


def test_pack_python_docs_with_a_char_tokenizer():
    src = open_text_source("python-docs")
    out = pack_contexts(
        src.documents(),
        lambda s: [ord(c) % 256 for c in s],
        context_size=128,
        n_contexts=50,
        bos_token_id=256,
        separator_token_id=257,
        progress=False,
    )
    assert out.shape == (50, 128) and (out[:, 0] == 256).all()
    assert (out[:, 1:] < 258).all()


# ------------------------------------------------------------------------------------------
# local files


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep any Arrow cache written by non-streaming loads inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


def test_txt_files_one_document_per_file(tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("second file\nwith two lines\n")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "c.txt").write_text("")
    expected_paths = tuple(str((tmp_path / n).resolve()) for n in ("a.txt", "b.txt", "c.txt"))

    src = open_text_source(str(tmp_path / "*.txt"))
    assert src.kind == "files" and src.text_column == "text" and src.paths == expected_paths
    docs = list(src.documents())
    assert docs[:2] == ["first file", "second file\nwith two lines\n"]
    assert all(d == "" for d in docs[2:])
    assert list(src.documents()) == docs  # re-iterable, same order

    record = src.describe()
    assert json.loads(json.dumps(record)) == record
    assert record["paths"] == list(expected_paths) and record["kind"] == "files"

    # a comma-separated list in any order, with a relative path, gives the same sorted paths
    monkeypatch.chdir(tmp_path)
    src2 = open_text_source(f"{tmp_path / 'b.txt'}, a.txt")
    assert src2.paths == expected_paths[:2]
    assert list(src2.documents()) == docs[:2]


def test_jsonl_files(tmp_path, datasets_cache):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": f"row {i}", "body": f"body {i}", "n": i} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    src = open_text_source(str(path))
    assert list(src.documents()) == [r["text"] for r in rows]
    src = open_text_source(str(path), text_column="body")
    assert src.text_column == "body"
    assert list(src.documents()) == [r["body"] for r in rows]
    src = open_text_source(str(path), streaming=False)
    assert list(src.documents()) == [r["text"] for r in rows]


def test_a_parquet_glob_reads_every_part_in_order_and_refuses_a_missing_or_non_text_column(tmp_path, datasets_cache):
    """A glob over parquet parts yields the chosen column's documents part by part, row by row (and they
    pack into contexts in that order); without a text column the one-line error lists the columns there
    are, and a column that is not text is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for part in range(2):
        table = pa.table({"content": [f"p{part} doc {i}" for i in range(3)], "n": list(range(3))})
        pq.write_table(table, tmp_path / f"part-{part}.parquet")

    src = open_text_source(str(tmp_path / "part-*.parquet"), text_column="content")
    assert len(src.paths) == 2
    assert list(src.documents()) == [f"p{p} doc {i}" for p in range(2) for i in range(3)]

    with pytest.raises(SaepipeError) as info:
        open_text_source(str(tmp_path / "part-*.parquet"))
    msg = str(info.value)
    assert "'text'" in msg and "content" in msg and "n" in msg and "\n" not in msg

    with pytest.raises(SaepipeError, match="not text"):
        open_text_source(str(tmp_path / "part-*.parquet"), text_column="n")

    out = pack_contexts(
        src.documents(),
        lambda s: [ord(c) for c in s],
        context_size=10,
        n_contexts=3,
        bos_token_id=0,
        separator_token_id=1,
        progress=False,
    )
    assert "".join(chr(t) for t in out[:, 1:].ravel()) == "p0 doc 0\x01p0 doc 1\x01p0 doc 2\x01"


def test_missing_column_lists_columns(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"content": "a", "meta": 1}) + "\n")
    with pytest.raises(SaepipeError) as info:
        open_text_source(str(path), text_column="text")
    msg = str(info.value)
    assert "no column 'text'" in msg and "content" in msg and "meta" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "spec, match",
    [
        ("missing.txt", "file not found"),
        ("{tmp}/nothing-*.jsonl", "no files match"),
        ("{tmp}/data.csv", "unknown file extension '.csv'"),
        ("{tmp}/a.txt,{tmp}/b.jsonl", "mixes file kinds"),
        ("{tmp}", "is a directory"),
    ],
)
def test_bad_file_arguments(tmp_path, monkeypatch, spec, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(SaepipeError, match=match) as info:
        open_text_source(spec.format(tmp=tmp_path))
    assert "\n" not in str(info.value)


def test_constructed_by_hand_source_reopens(tmp_path):
    (tmp_path / "a.txt").write_text("hand made")
    src = TextSource(name="a.txt", kind="files", split="train", text_column="text", paths=(str(tmp_path / "a.txt"),))
    assert list(src.documents()) == ["hand made"]


# ------------------------------------------------------------------------------------------
# Hugging Face names, offline


@pytest.fixture
def offline_hub(monkeypatch):
    """Make datasets fail at once instead of retrying the unreachable hub (~25 s).

    HF_HUB_OFFLINE is read when datasets / huggingface_hub are imported, so setting the
    environment variable alone is not enough once they are: patch the module constants too.
    """
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", ["no-such-user-xyz/no-such-dataset-xyz", "no-such-dataset-xyz", "org/name-v1.2"])
def test_unknown_hf_dataset_fails_fast(offline_hub, name):
    start = time.monotonic()
    with pytest.raises(SaepipeError) as info:
        open_text_source(name)
    assert time.monotonic() - start < 20
    assert str(info.value) == (
        f"dataset '{name}' could not be loaded (not found locally and the hub is unreachable): "
        "pass local .txt/.jsonl/.parquet files or use --dataset python-docs"
    )
    assert info.value.__cause__ is not None
