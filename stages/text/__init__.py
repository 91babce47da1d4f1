"""Where the text comes from (python-docs, an HF dataset, local files) and how it is cut into contexts."""

from stages.text.packing import pack_contexts
from stages.text.sources import PYTHON_DOCS, TextSource, open_text_source

__all__ = ["PYTHON_DOCS", "TextSource", "open_text_source", "pack_contexts"]
