"""A store whose metadata asks for more memory than the machine has is refused in one line, before any
allocation sized by it."""

import json
import shutil
import tracemalloc

import pytest

from store_schema import schema
from store_schema.header import StoreHeader
from store_schema.limits import check_fits_in_memory
from store_schema.reader import ActivationStore


def test_a_real_store_fits_and_a_small_machine_refuses_it(tiny_store):
    store = ActivationStore.open(tiny_store)
    check_fits_in_memory(store.group, store.header)
    with pytest.raises(schema.StoreError, match=r"describes a chunk of rows \(512 x 64 fp16\).*more than this machine"):
        check_fits_in_memory(store.group, store.header, memory_bytes=200_000)


@pytest.mark.parametrize("field", ["chunk_rows", "contexts", "skipped"])
def test_absurd_sizes_in_the_metadata_are_refused_before_allocating(tiny_store, tmp_path, field):
    path = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, path)
    if field == "contexts":  # the split array claims 10^15 contexts
        meta_path = path / schema.CONTEXT_SPLIT / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["shape"] = [10**15]
        meta_path.write_text(json.dumps(meta))
    else:
        root_path = path / "zarr.json"
        root = json.loads(root_path.read_text())
        header = root["attributes"][schema.ATTRS_KEY]
        if field == "chunk_rows":  # and the arrays agree, as a crafted store would
            header["layout"]["chunk_rows"] = 2**40
            for split in schema.SPLITS:
                for name in schema.row_array_names(StoreHeader.from_attrs(header), split):
                    meta_path = path / name / "zarr.json"
                    meta = json.loads(meta_path.read_text())
                    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 2**40
                    meta_path.write_text(json.dumps(meta))
        else:
            header["progress"]["skipped_count"] = 10**14
        root_path.write_text(json.dumps(root))
    tracemalloc.start()
    with pytest.raises(schema.StoreError) as refused:
        ActivationStore.open(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = str(refused.value)
    assert "\n" not in message and "more than this machine can hold" in message, message
    assert peak < 50 * 2**20  # refused before anything sized by the metadata was allocated


def _with_header(tiny_store, tmp_path, change):
    path = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, path)
    root_path = path / "zarr.json"
    root = json.loads(root_path.read_text())
    change(root["attributes"][schema.ATTRS_KEY])
    root_path.write_text(json.dumps(root))
    return path


@pytest.mark.parametrize(
    "hooks, fragment",
    [
        (["../../../etc"], "is not a safe name"),
        (["/etc/passwd"], "is not a safe name"),
        (["blocks..2"], "is not a safe name"),
        (["blocks.2\x1b[2J"], "is not a safe name"),
        (["h" * 5000], "is not a safe name"),
        ([f"h{i}" for i in range(5000)], "more than the 4,096 a store may hold"),
    ],
)
def test_hook_names_that_could_leave_the_store_are_refused(tiny_store, tmp_path, hooks, fragment):
    path = _with_header(tiny_store, tmp_path, lambda header: header.update(hooks=hooks))
    with pytest.raises(schema.StoreError) as refused:  # from the header alone: no array path is built
        ActivationStore.open(path)
    message = str(refused.value)
    assert fragment in message and "\n" not in message and len(message) < 400, message


def test_a_huge_root_metadata_file_is_refused_unread(tiny_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, path)
    with open(path / "zarr.json", "ab") as f:
        f.truncate(65 << 20)  # a sparse file: no disk, but 65 MiB to whoever reads it
    tracemalloc.start()
    with pytest.raises(schema.StoreError, match="far more than a store's root metadata"):
        ActivationStore.open(path)
    assert tracemalloc.get_traced_memory()[1] < 20 * 2**20
    tracemalloc.stop()
