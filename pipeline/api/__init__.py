"""saepipe's public Python API: stores and runs for code of one's own (a notebook, another trainer).

    from pipeline import api as saepipe

    store = saepipe.open_store("stores/my_store.zarr")   # a folder or a URL; repr() summarizes it
    for x in store.batches("blocks.15.hook_resid_post", 4096).take(100): ...
    sae = saepipe.load_run("runs/my_run")                # encode/decode raw activations

Guide and recipes: docs/python-api.md.

Stability: the names in ``__all__`` and their documented arguments are the public API. Until saepipe 1.0 a
change to them is named in the release notes and, where it can be, kept working for one release with a
DeprecationWarning. Everything else in saepipe's packages (stages, store_schema, the CLI's modules) is
internal and changes without notice; the store format itself is versioned separately
(store_schema/SPEC.md).
"""

from pipeline.api.batches import ActivationDataset, Batches
from pipeline.api.runs import TrainedSAE, load_run
from pipeline.api.store import Rows, Store, open_store
from stages.basics.errors import SaepipeError
from store_schema.normalization import Normalization
from store_schema.schema import StoreError

__all__ = [
    "ActivationDataset",
    "Batches",
    "Normalization",
    "Rows",
    "SaepipeError",
    "Store",
    "StoreError",
    "TrainedSAE",
    "load_run",
    "open_store",
]
