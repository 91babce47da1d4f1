"""Labelled texts for k-sparse probing: the offline default task, built from the standard library's own
docstrings, or any data set with a text and a label column (local .jsonl/.parquet files, or an HF data set
when the hub is reachable).

The default task, `stdlib-package`: each text is the docstring of one class or function of the standard
library, labelled with the top-level package that defines it (email, asyncio, xml, ...). Only packages
(directories, not single modules) count, the test packages and idlelib left out as in python-docs, and
the `PACKAGES` classes with the most docstrings are kept. What it asks of a model's activations: does a
docstring read like the email package's, or the asyncio package's?

Definitions and sizes: docs/metrics.md#k-sparse-probing
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stages.basics.errors import SaepipeError, first_line
from stages.text.python_docs import stdlib_sources

STDLIB_PACKAGE = "stdlib-package"
PACKAGES = 6  # the default task's classes: the packages with the most docstrings
MIN_CHARS = 80  # shorter docstrings ("Return self.") say too little to classify


@dataclass(frozen=True)
class ProbingData:
    name: str
    texts: list[str]
    labels: list[str]


def probing_data(spec: str, text_column: str = "text", label_column: str = "label") -> ProbingData:
    """`stdlib-package`, local .jsonl/.json/.parquet files, or an HF data set name (its train split)."""
    if spec == STDLIB_PACKAGE:
        return stdlib_package_docstrings()
    suffix = Path(spec).suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    import datasets

    try:
        if builder is not None:
            if not Path(spec).is_file():
                raise SaepipeError(f"--probe-data {spec}: no such file")
            ds = datasets.load_dataset(builder, data_files=[spec], split="train")
        else:
            ds = datasets.load_dataset(spec, split="train")
    except SaepipeError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise SaepipeError(
            f"--probe-data {spec} could not be read ({first_line(e)}): pass {STDLIB_PACKAGE}, .jsonl/.parquet "
            f"files, or an HF data set name (with the hub reachable)"
        ) from None
    for column, flag in ((text_column, "--probe-text-column"), (label_column, "--probe-label-column")):
        if column not in ds.column_names:
            raise SaepipeError(
                f"--probe-data {spec} has no column '{column}' (columns: {', '.join(ds.column_names)}): pass {flag}"
            )
    texts = [str(t) for t in ds[text_column]]
    return ProbingData(spec, texts, [str(label) for label in ds[label_column]])


def stdlib_package_docstrings(packages: int = PACKAGES) -> ProbingData:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, labels = [], []
    for rel in stdlib_sources(stdlib):
        package, sep, _ = rel.partition("/")
        if not sep:  # a single module, not a package
            continue
        for doc in _docstrings(stdlib / rel):
            if len(doc) >= MIN_CHARS:
                texts.append(doc)
                labels.append(package)
    kept = {name for name, _ in Counter(labels).most_common(packages)}
    pairs = [(t, label) for t, label in zip(texts, labels) if label in kept]
    return ProbingData(STDLIB_PACKAGE, [t for t, _ in pairs], [label for _, label in pairs])


def _docstrings(path: Path) -> list[str]:
    """The docstrings of a file's classes and functions (nested ones included), without their signatures."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    nodes = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, nodes) and (doc := ast.get_docstring(node))]
