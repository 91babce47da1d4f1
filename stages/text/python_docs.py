"""The offline default corpus: the documentation that ships with the running Python (pydoc_data topics
and the standard library's docstrings, read with ast so that no module is imported)."""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Directories of the standard library whose docstrings are not used for python-docs.
_STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "__pycache__",
    }
)


def python_docs_documents() -> Iterator[str]:
    """The documentation shipped with this Python, one document per pydoc topic and per module."""
    try:
        from pydoc_data.topics import topics  # a plain dict of strings; no side effects
    except ImportError:  # some distributions package pydoc_data separately
        topics = {}
    for key in sorted(topics):
        text = topics[key]
        if text and text.strip():
            yield text
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in stdlib_sources(stdlib):
        doc = _module_document(stdlib / rel, rel)
        if doc:
            yield doc


def stdlib_sources(stdlib: Path) -> list[str]:
    """Relative POSIX paths of the stdlib .py files used for python-docs, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath, name).relative_to(stdlib).as_posix())
    return sorted(found)


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or rel


def _module_document(path: Path, rel: str) -> str:
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for invalid escapes
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return ""
    sections = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        sections.append(f"module {_module_name(rel)}\n{module_doc}")
    sections.extend(_definition_docs(tree.body, prefix=""))
    return "\n\n".join(sections)


def _definition_docs(body: list[ast.stmt], prefix: str) -> Iterator[str]:
    """Docstrings of the classes and functions defined in ``body`` (and in nested classes)."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc:
                yield f"class {prefix}{node.name}\n{doc}"
            yield from _definition_docs(node.body, prefix=f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
                try:
                    args = ast.unparse(node.args)
                except Exception:  # noqa: BLE001 - unparse of exotic defaults; keep the docstring
                    args = "..."
                yield f"{keyword} {prefix}{node.name}({args})\n{doc}"
