"""The bytes of a tiny-model store, file by file, against a recorded manifest: code that moves must not
change what collect writes. Recorded before the layout refactor; re-recorded for schema version 2, where
every row array, token and mapping file kept its bytes, the root metadata changed and the running sums'
and skipped contexts' arrays are new; re-recorded when the header's model gained `forward` (only
zarr.json changed); re-recorded when RunningStats.update summed 256 rows at a time (only zarr.json's
floats: one sum of squares, 395091.5961106577 -> ...576, moved by one unit in the last place; every
row, column sum and maximum kept its bytes). The same collect with two chunks to a shard (schema version
4) has its own manifest since 2026-12-08; the file-per-chunk store's kept every byte when shards came.

Activations are floats computed by the CPU's kernels, whose last bits depend on the instruction set
(AVX-512, AVX2, ...). A kernel probe, recorded with the manifest, tells whether this machine computes
the recorded floats; where it does not, only the files that no float reaches are compared (tokens, the
split, the row mapping, array metadata and the root attributes other than statistics).

Regenerate the manifest, after a deliberate change of the store's bytes:
    SAEPIPE_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/stages/collect/test_golden_store.py
"""

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import run

# by chunks per shard: a file per chunk, and the sharded layout (two chunks a shard)
MANIFESTS = {
    1: Path(__file__).parent / "golden" / "tiny_store.json",
    2: Path(__file__).parent / "golden" / "tiny_store_sharded.json",
}
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there"
).split()
COLLECT = [
    "collect",
    "--model",
    "tiny-random",
    "--dataset",
    "corpus/*.txt",
    "--hook",
    "blocks.1.hook_resid_post",
    "--hook",
    "blocks.3.hook_mlp_out",
    "--tokens",
    "6000",
    "--context-size",
    "64",
    "--chunk-rows",
    "1000",
    "--shuffle-buffer-rows",
    "2500",
    "--warmup-rows",
    "2000",
    "--no-progress",
    "--out",
    "s.zarr",
]
FLOAT_ATTRIBUTES = ("running_stats", "normalization")  # root attributes computed from activations


def kernel_probe() -> str:
    """A hash of the float ops a tiny transformer runs (linear, layer norm, GELU, softmax attention)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    w1, w2 = torch.randn(256, 64, generator=g) / 8, torch.randn(64, 256, generator=g) / 16
    h = torch.nn.functional.gelu(torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (64,)), w1))
    y = torch.nn.functional.linear(h, w2)
    q = x.view(8, 64, 64)
    a = torch.softmax(q @ q.transpose(1, 2) / 8, dim=-1) @ q
    return hashlib.sha256(y.numpy().tobytes() + a.numpy().tobytes()).hexdigest()[:16]


def floats_reach(name: str) -> bool:
    return "/acts/" in name or name.startswith(("normalization/", "running_sums/"))


def manifest_of(store: Path, workdir: Path) -> dict[str, str]:
    files = {}
    for path in sorted(store.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(store).as_posix()
        data = path.read_bytes().replace(str(workdir).encode(), b"<workdir>")
        if name == "zarr.json":  # the root: its statistics are floats; the rest is compared always
            attrs = json.loads(data)["attributes"]["saepipe"]
            files["zarr.json#floats"] = _digest(json.dumps({k: attrs.pop(k) for k in FLOAT_ATTRIBUTES}).encode())
            data = json.dumps(attrs).encode()
        files[name] = _digest(data)
    return files


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.mark.parametrize("shard_chunks", sorted(MANIFESTS))
def test_tiny_store_bytes_are_unchanged(tmp_path, monkeypatch, shard_chunks):
    rng = random.Random(0)
    (tmp_path / "corpus").mkdir()
    for i in range(40):
        (tmp_path / "corpus" / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)) + "\n")
    monkeypatch.chdir(tmp_path)  # the dataset is named by a relative path: the config fingerprint stays put
    result = run(*COLLECT, "--shard-chunks", shard_chunks)
    assert result.exit_code == 0, result.output
    files, probe = manifest_of(tmp_path / "s.zarr", tmp_path), kernel_probe()
    manifest = MANIFESTS[shard_chunks]
    if os.environ.get("SAEPIPE_WRITE_GOLDEN"):
        manifest.write_text(json.dumps({"kernel_probe": probe, "files": files}, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(manifest.read_text())
    same_kernels = recorded["kernel_probe"] == probe
    assert sorted(files) == sorted(recorded["files"])
    compared = [name for name in files if same_kernels or not (floats_reach(name) or name == "zarr.json#floats")]
    assert len(compared) >= 20
    changed = [name for name in compared if files[name] != recorded["files"][name]]
    assert not changed, f"store files changed: {changed}"
