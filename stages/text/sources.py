"""Finding the text: the python-docs corpus, an HF dataset or local files, checked eagerly so that a bad
--dataset fails before any model is loaded."""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.basics.errors import SaepipeError, first_line
from stages.text.python_docs import python_docs_documents
from stages.text.synthetic_text import SYNTHETIC_TEXT, synthetic_documents

# datasets and pyarrow are imported where an HF dataset or local files are read: python-docs needs
# neither, and datasets is slow to import.

PYTHON_DOCS = "python-docs"


# File suffix -> (datasets packaged builder, extra load_dataset kwargs).
_FILE_LOADERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".txt": ("text", {"sample_by": "document"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


# Suffixes that clearly name a local data file we do not read: such an argument is treated as
# a file (so the user gets "unknown extension"), never sent to the Hub as a dataset name.
_OTHER_FILE_SUFFIXES = {
    ".csv",
    ".tsv",
    ".arrow",
    ".feather",
    ".md",
    ".rst",
    ".html",
    ".htm",
    ".xml",
    ".pdf",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
    ".zip",
    ".tar",
    ".tgz",
    ".7z",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".pt",
    ".bin",
    ".safetensors",
    ".zarr",
    ".h5",
    ".hdf5",
    ".doc",
    ".docx",
    ".text",
    ".log",
    ".py",
    ".yaml",
    ".yml",
    ".ndjson",
    ".pq",
}


_GLOB_CHARS = set("*?[")


_HF_BATCH = 64  # rows fetched per batch when iterating a datasets object


@dataclass(frozen=True)
class TextSource:
    name: str  # "python-docs", an HF dataset name, or a description of local files
    kind: str  # "builtin" | "synthetic" | "hf" | "files"
    split: str | None
    text_column: str | None
    paths: tuple[str, ...] = ()  # local files, resolved absolute, sorted (empty otherwise)
    # The datasets object opened (and checked) by open_text_source; reused by documents().
    _dataset: Any = field(default=None, repr=False, compare=False, hash=False)

    def describe(self) -> dict:
        """JSON-able record of where the text came from, for store metadata."""
        record: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "split": self.split,
            "text_column": self.text_column,
            "paths": list(self.paths),
        }
        if self.kind == "builtin":
            # The python-docs text is whatever this interpreter ships with.
            record["python_version"] = sys.version
        return record

    def documents(self) -> Iterator[str]:
        """Yield the document texts, lazily, in a deterministic order."""
        if self.kind == "builtin":
            return python_docs_documents()
        if self.kind == "synthetic":
            return synthetic_documents()
        if self.kind in ("hf", "files"):
            ds = self._dataset
            if ds is None:  # constructed by hand rather than by open_text_source
                ds = _reopen(self)
            return _iter_column(ds, self.text_column or "text", self.name)
        raise SaepipeError(f"unknown text source kind '{self.kind}': use 'builtin', 'hf' or 'files'")


def open_text_source(
    dataset: str, split: str = "train", text_column: str = "text", streaming: bool = True
) -> TextSource:
    """Resolve ``dataset`` to a TextSource, checking eagerly that it can be read.

    Raises SaepipeError (one line) for a missing file, an unknown extension, a dataset that
    cannot be found or loaded, or a missing text column.
    """
    spec = (dataset or "").strip()
    if not spec:
        raise SaepipeError(
            "no dataset given: pass --dataset python-docs, an HF dataset name, or local .txt/.jsonl/.parquet files"
        )
    if spec == PYTHON_DOCS:
        return TextSource(name=PYTHON_DOCS, kind="builtin", split=None, text_column=None, paths=())
    if spec == SYNTHETIC_TEXT:
        return TextSource(name=SYNTHETIC_TEXT, kind="synthetic", split=None, text_column=None, paths=())
    if _looks_like_files(spec):
        return _open_files(spec, text_column, streaming)
    return _open_hf(spec, split, text_column, streaming)


def _looks_like_files(spec: str) -> bool:
    if "," in spec or any(c in _GLOB_CHARS for c in spec):
        return True
    if spec.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(spec):
        return True
    suffix = Path(spec).suffix.lower()
    return suffix in _FILE_LOADERS or suffix in _OTHER_FILE_SUFFIXES


def _expand_paths(spec: str) -> tuple[str, ...]:
    found: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        pattern = os.path.expanduser(part)
        if any(c in _GLOB_CHARS for c in pattern):
            matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise SaepipeError(f"no files match '{part}': check the pattern, or pass the files explicitly")
            found.update(os.path.abspath(m) for m in matches)
            continue
        if os.path.isdir(pattern):
            raise SaepipeError(f"'{part}' is a directory: pass the files in it, e.g. '{os.path.join(part, '*.txt')}'")
        if not os.path.isfile(pattern):
            raise SaepipeError(f"file not found: '{part}': check the path, or use --dataset python-docs")
        found.add(os.path.abspath(pattern))
    if not found:
        raise SaepipeError(f"no files named in '{spec}': pass local .txt/.jsonl/.parquet files")
    return tuple(sorted(found))


def _open_files(spec: str, text_column: str, streaming: bool) -> TextSource:
    paths = _expand_paths(spec)
    builders = set()
    for p in paths:
        suffix = Path(p).suffix.lower()
        if suffix not in _FILE_LOADERS:
            raise SaepipeError(
                f"unknown file extension '{suffix or '(none)'}' for '{p}': use .txt, .jsonl/.json or .parquet files"
            )
        builders.add(_FILE_LOADERS[suffix][0])
    if len(builders) > 1:
        raise SaepipeError(
            f"'{spec}' mixes file kinds ({', '.join(sorted(builders))}): pass files of one kind (.txt, .jsonl/.json or .parquet)"
        )
    builder = builders.pop()
    extra = _FILE_LOADERS[Path(paths[0]).suffix.lower()][1]
    # .txt files have a single column called "text"; --text-column does not apply to them.
    column = "text" if builder == "text" else text_column
    if _no_rows(builder, paths):  # datasets fails on these with unhelpful errors (StopIteration, ...)
        raise SaepipeError(f"'{spec}' holds no rows (the files are empty): pass files with text in them")
    ds = _load_files(builder, paths, extra, streaming, spec)
    _check_column(ds, column, spec)
    return TextSource(name=spec, kind="files", split="train", text_column=column, paths=paths, _dataset=ds)


def _no_rows(builder: str, paths: tuple[str, ...]) -> bool:
    """Whether every file is empty: no bytes, or a parquet file of no rows."""
    if builder != "parquet":
        return all(os.path.getsize(p) == 0 for p in paths)
    import pyarrow.parquet as pq

    try:
        return all(pq.read_metadata(p).num_rows == 0 for p in paths)
    except Exception:  # noqa: BLE001 - not parquet after all: load_dataset names the problem
        return False


def _load_files(builder: str, paths: tuple[str, ...], extra: dict, streaming: bool, spec: str):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=list(paths), split="train", streaming=streaming, **extra)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise SaepipeError(f"could not read '{spec}' as {builder} files ({_first_line(e)}): check the files") from e


def _open_hf(name: str, split: str, text_column: str, streaming: bool) -> TextSource:
    ds = _load_hf_dataset(name, split, streaming)
    _check_column(ds, text_column, name)
    return TextSource(name=name, kind="hf", split=split, text_column=text_column, paths=(), _dataset=ds)


def _load_hf_dataset(name: str, split: str, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - offline it may be ConnectionError, FileNotFoundError, ...
        msg = str(e)
        if isinstance(e, (ValueError, KeyError)) and ("split" in msg.lower()):
            raise SaepipeError(
                f"dataset '{name}' has no split '{split}' ({_first_line(e)}): pass another --split"
            ) from e
        raise SaepipeError(
            f"dataset '{name}' could not be loaded (not found locally and the hub is unreachable): "
            "pass local .txt/.jsonl/.parquet files or use --dataset python-docs"
        ) from e


def _reopen(source: TextSource):
    if source.kind == "files":
        suffix = Path(source.paths[0]).suffix.lower() if source.paths else ""
        if suffix not in _FILE_LOADERS:
            raise SaepipeError(f"text source '{source.name}' has no readable files: pass .txt/.jsonl/.parquet files")
        builder, extra = _FILE_LOADERS[suffix]
        return _load_files(builder, source.paths, extra, True, source.name)
    return _load_hf_dataset(source.name, source.split or "train", True)


def _column_names(ds) -> list[str] | None:
    features = getattr(ds, "features", None)
    if features:
        return list(features)
    names = getattr(ds, "column_names", None)
    return list(names) if names else None


def _check_column(ds, column: str, label: str) -> None:
    """Raise SaepipeError unless ``ds`` has a text column ``column``."""
    names = _column_names(ds)
    first_row = None
    if names is None:
        # Streaming JSON has no schema until read: look at the first row.
        try:
            first_row = next(iter(ds), None)
        except Exception as e:  # noqa: BLE001
            raise SaepipeError(f"could not read the first row of '{label}' ({_first_line(e)}): check the data") from e
        if first_row is None:
            raise SaepipeError(f"'{label}' holds no rows: use a dataset with text in it")
        names = list(first_row)
    if column not in names:
        raise SaepipeError(
            f"'{label}' has no column '{column}' (available columns: {', '.join(names) or 'none'}): "
            "pass --text-column with one of them"
        )
    features = getattr(ds, "features", None)
    if features and column in features:
        dtype = getattr(features[column], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise SaepipeError(
                f"column '{column}' of '{label}' holds {features[column]!r}, not text: pass --text-column naming a text column"
            )
    elif first_row is not None and not isinstance(first_row.get(column), (str, type(None))):
        raise SaepipeError(
            f"column '{column}' of '{label}' holds {type(first_row[column]).__name__} values, not text: "
            "pass --text-column naming a text column"
        )


def _iter_column(ds, column: str, label: str) -> Iterator[str]:
    try:
        ds = ds.select_columns([column])
    except Exception:  # noqa: BLE001 - older objects without select_columns: iterate whole rows
        pass
    batches = iter(ds.iter(batch_size=_HF_BATCH))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a row past the first that the reader cannot parse
            raise SaepipeError(f"could not read '{label}' ({_first_line(e)}): check the data") from e
        for text in batch[column]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise SaepipeError(
                    f"column '{column}' of '{label}' holds {type(text).__name__} values, not text: "
                    "pass --text-column naming a text column"
                )
            yield text


def _first_line(e: BaseException) -> str:
    return first_line(e, limit=200)  # a data set's errors can quote whole rows
