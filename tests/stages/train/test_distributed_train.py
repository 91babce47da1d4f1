"""Data-parallel training (torch.distributed, gloo, 2 CPU processes) trains what one process trains on
the same global batches: every architecture, including the ones whose losses use batch statistics
(AuxK's and ghost grads' normalizers, BatchTopK's batch-wide selection and threshold, JumpReLU's L0
target) and the dead-latent clock, which must agree across ranks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.basics import run_dir
from stages.basics.errors import SaepipeError
from stages.train import run_sweep
from stages.train.config import TrainConfig
from store_schema.generated import write_array_store

BATCH = 256
# (arch, settings): small dead windows, so AuxK and ghost grads act within the run
ARCHS = [
    ("topk", dict(k=4, dead_window_tokens=2 * BATCH)),
    ("batchtopk", dict(k=4, dead_window_tokens=2 * BATCH)),
    ("matryoshka", dict(k=4, groups=(16, 64, 128))),
    ("relu", dict(l1_coef=1.0, ghost_grads=True, dead_window_tokens=2 * BATCH)),
    ("jumprelu", dict(target_l0=8.0)),
    ("mp", dict(k=4)),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = 32
    train = (rng.standard_normal((8192, d)) * np.linspace(0.5, 3, d) + 1).astype(np.float32)
    path = tmp_path_factory.mktemp("ddp") / "s.zarr"
    # chunks of 512 rows and 2-chunk windows: the streaming loader's ranks read disjoint runs
    write_array_store(path, train, train[:256], hook="h", chunk_rows=512)
    return path


def configs(store: Path, out: Path, resident: bool) -> list[TrainConfig]:
    return [
        TrainConfig.from_flat(
            store=str(store),
            hook="h",
            arch=arch,
            width=128,
            tokens=30 * BATCH,
            batch_size=BATCH,
            out=str(out / arch),
            log_every=5,
            checkpoint_every=10,
            resident=resident,
            progress=False,
            **settings,
        )
        for arch, settings in ARCHS
    ]


@pytest.mark.parametrize("resident", [True, False])
def test_two_processes_train_what_one_process_trains(store, tmp_path, resident):
    single = run_sweep(configs(store, tmp_path / "single", resident))
    parallel = run_sweep(configs(store, tmp_path / "ddp", resident), nproc=2)
    assert [p.name for p in parallel] == [p.name for p in single]
    for one, two in zip(single, parallel):
        a, b = load_file(one / "sae.safetensors"), load_file(two / "sae.safetensors")
        assert a.keys() == b.keys()
        for name in a:  # the sums run in another order: equal up to float32 rounding
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{one.name} {name}")
        log_a = [json.loads(line) for line in (one / "train_log.jsonl").read_text().splitlines()]
        log_b = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log_b] == [r["step"] for r in log_a] == list(range(5, 31, 5))
        for ra, rb in zip(log_a, log_b):
            for key in ("loss", "fve", "l0", "dead_fraction"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-5), (one.name, key)
        cfg = json.loads((two / "cfg.json").read_text())
        assert cfg["finished"] and (two / "saelens" / "sae_weights.safetensors").exists()
        assert not (two / run_dir.CHECKPOINT).exists()
    # the revival terms were exercised: some latents were dead at some point
    topk_log = [json.loads(line) for line in (single[0] / "train_log.jsonl").read_text().splitlines()]
    assert any(r["dead_fraction"] > 0 and r["aux_loss"] > 0 for r in topk_log)


def test_a_batch_that_does_not_split_evenly_is_refused(store, tmp_path):
    cfg = configs(store, tmp_path, False)[0]
    cfg.batch_size = 255
    with pytest.raises(SaepipeError, match="does not split evenly over 2 processes"):
        run_sweep([cfg], nproc=2)
    assert not (tmp_path / "topk").exists()


def test_a_single_process_checkpoint_resumes_on_two_processes(store, tmp_path, crash_training):
    whole = run_sweep(configs(store, tmp_path / "whole", False)[:1])[0]
    cut = configs(store, tmp_path / "cut", False)[:1]
    crash_training.arm(17)  # dies after 17 steps: the checkpoint at 10 survives
    with pytest.raises(crash_training.Crash):
        run_sweep(cut)
    crash_training.disarm()
    cut[0].resume = True
    resumed = run_sweep(cut, nproc=2)[0]
    a, b = load_file(whole / "sae.safetensors"), load_file(resumed / "sae.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert [r["step"] for r in run_dir.read_log(resumed)] == list(range(5, 31, 5))  # none twice, none missing


@pytest.fixture(scope="module")
def layers_store(tmp_path_factory):
    """Two layers' MLP inputs and outputs (32 wide), row-aligned: what transcoders, crosscoders and CLTs read."""
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((32, 32)).astype(np.float32) / 6
    rows = {}
    for layer in range(2):
        x = (rng.standard_normal((8192, 32)) * np.linspace(0.5, 3, 32)).astype(np.float32)
        rows |= {f"blocks.{layer}.mlp.hook_in": x, f"blocks.{layer}.hook_mlp_out": np.maximum(x @ mix, 0)}
    path = tmp_path_factory.mktemp("ddp-layers") / "s.zarr"
    write_array_store(path, rows, {h: r[:256] for h, r in rows.items()}, chunk_rows=512)
    return path


MULTI_HOOK = [
    ("transcoder", dict(in_hook="blocks.0.mlp.hook_in", out_hook="blocks.0.hook_mlp_out", k=4)),
    ("skip_transcoder", dict(in_hook="blocks.1.mlp.hook_in", out_hook="blocks.1.hook_mlp_out", activation="batchtopk")),
    ("crosscoder", dict(hooks=("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"), k=4)),
    ("clt", dict(layers="0-1", k=4)),
]


@pytest.mark.parametrize("arch, settings", MULTI_HOOK, ids=[arch for arch, _ in MULTI_HOOK])
def test_two_processes_train_each_multi_hook_architecture_as_one_does(layers_store, tmp_path, arch, settings):
    def config(out):
        return TrainConfig.from_flat(
            store=str(layers_store), arch=arch, width=64, tokens=30 * BATCH, batch_size=BATCH, out=str(out),
            log_every=5, checkpoint_every=10, resident=False, progress=False, dead_window_tokens=2 * BATCH,
            **settings,
        )  # fmt: skip

    one = run_sweep([config(tmp_path / "single")])[0]
    two = run_sweep([config(tmp_path / "ddp")], nproc=2)[0]
    a, b = load_file(one / "sae.safetensors"), load_file(two / "sae.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{arch} {name}")
    for ra, rb in zip(run_dir.read_log(one), run_dir.read_log(two)):
        for key in ("loss", "fve", "l0", "dead_fraction"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-5), (arch, key)
