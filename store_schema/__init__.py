"""The on-disk contract of saepipe's activation store: schema, writer, reader and batch loader.

SPEC.md in this folder describes every array and attribute, for readers using plain `zarr`.
"""

from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore, open_store
from store_schema.schema import SCHEMA_NAME, SCHEMA_VERSION, StoreError

__all__ = ["ActivationStore", "Normalization", "SCHEMA_NAME", "SCHEMA_VERSION", "StoreError", "open_store"]
