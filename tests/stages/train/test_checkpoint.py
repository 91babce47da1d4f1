"""Checkpoints are safetensors plus a JSON header: everything a resume needs survives the round trip
exactly, a damaged one is refused in one line, and a pickled checkpoint.pt from an earlier saepipe (or
from anyone) is refused without ever being unpickled."""

import json
import os
from pathlib import Path

import pytest
import torch

from stages.basics import run_dir
from stages.basics.errors import SaepipeError
from stages.train.checkpoint import Checkpoint
from tests.helpers.cli import expect_error, run, run_ok

REPO = Path(__file__).resolve().parents[3]


def _trained_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    for _ in range(3):
        model(torch.randn(5, 8)).square().mean().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_everything_a_resume_needs_survives_exactly(tmp_path):
    model, optimizer, scheduler = _trained_state()
    saved = Checkpoint(
        step=3,
        sae=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        tokens_since_fired=torch.arange(4),
        mse_scale=0.1 + 0.2,  # a float with no short decimal form
        store_fingerprint="abc",
        config={"width": 4, "betas": [0.9, 0.99]},
    )
    saved.save(tmp_path / run_dir.CHECKPOINT)
    loaded = Checkpoint.load(tmp_path / run_dir.CHECKPOINT)
    assert (loaded.step, loaded.mse_scale, loaded.store_fingerprint, loaded.config) == (
        3,
        0.1 + 0.2,
        "abc",
        saved.config,
    )
    assert loaded.scheduler == scheduler.state_dict()
    assert loaded.optimizer["param_groups"] == optimizer.state_dict()["param_groups"]  # betas a tuple again
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded.optimizer["state"][index][key], value), (index, key)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.sae[name], value)
    assert torch.equal(loaded.tokens_since_fired, torch.arange(4))
    fresh, fresh_optimizer, _ = _trained_state()
    fresh_optimizer.load_state_dict(loaded.optimizer)  # accepted as torch's own state dict


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    path = tmp_path / run_dir.CHECKPOINT
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SaepipeError, match="is damaged .*: pass --overwrite to train again"):
        Checkpoint.load(path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["SAEPIPE_TEST_MARKER"]),))


def test_a_pickled_checkpoint_is_never_unpickled(tmp_path, monkeypatch, tiny_store):
    marker = tmp_path / "the-pickle-ran"
    monkeypatch.setenv("SAEPIPE_TEST_MARKER", str(marker))
    (tmp_path / "run").mkdir()
    torch.save({"payload": _Payload()}, tmp_path / "run" / run_dir.PICKLED_CHECKPOINT)
    torch.load(tmp_path / "run" / run_dir.PICKLED_CHECKPOINT, weights_only=False)  # the planted file works...
    assert marker.exists()
    marker.unlink()
    args = ["train", tiny_store, "--width", "32", "--k", "4", "--tokens", "2048", "--batch-size", "512"]
    expect_error(run(*args, "--resume", "--out", tmp_path / "run"), "a pickle, which saepipe no longer opens")
    assert not marker.exists()  # ...and saepipe never opened it
    run_ok(*args, "--overwrite", "--no-progress", "--out", tmp_path / "run")  # the way on that it names
    assert not marker.exists() and not (tmp_path / "run" / run_dir.PICKLED_CHECKPOINT).exists()


def test_no_code_unpickles_anything():
    sources = [p for top in ("stages", "pipeline", "store_schema") for p in (REPO / top).rglob("*.py")]
    offenders = [str(p) for p in sources if "torch.load(" in p.read_text() or "pickle.load" in p.read_text()]
    assert offenders == []


def test_checkpoints_with_malformed_documents_are_damaged_not_tracebacks(tmp_path):
    import pytest
    from safetensors.torch import save_file

    from stages.basics.errors import SaepipeError
    from stages.train.checkpoint import _META_KEY, Checkpoint

    good = {"step": 3, "mse_scale": 1.0, "store_fingerprint": "f", "config": {}, "scheduler": {},
            "optimizer": {"param_groups": [], "state": {}}}  # fmt: skip
    documents = {
        "empty": "{}",
        "list": "[1, 2]",
        "deep": "[" * 100_000 + "]" * 100_000,
        "text scale": json.dumps({**good, "mse_scale": "abc"}),
        "negative step": json.dumps({**good, "step": -4}),
        "nan scale": json.dumps({**good, "mse_scale": float("nan")}),
    }
    for name, document in documents.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({"clock": torch.zeros(1)}, str(path), metadata={_META_KEY: document})
        with pytest.raises(SaepipeError, match=r"is damaged \(\w+\): pass --overwrite to train again"):
            Checkpoint.load(path)
