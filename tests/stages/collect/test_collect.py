"""Collect on the tiny random model: contents, resume after kill -9, refusals, non-finite policy."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import collect as collect_stage
from stages.basics.errors import SaepipeError
from stages.collect.config import CollectConfig
from stages.collect.plan import PlanAction
from store_schema.reader import open_store
from tests.helpers.collect import HOOKS, SMALL, cli_args
from tests.helpers.files import tree_bytes


def test_rows_are_the_models_activations_at_their_recorded_positions(tmp_path):
    from stages.host_model.loading import load_host_model
    from stages.host_model.model import run_to_hooks

    collect_stage.run_collect(CollectConfig(out=str(tmp_path / "s.zarr"), **SMALL))
    store = open_store(tmp_path / "s.zarr")
    assert store.complete and store.hooks == list(HOOKS)
    assert store.n_rows("train") >= 6000 and store.n_rows("eval") > 0
    contexts, positions = store.read_mapping("train")
    assert positions.min() == 1  # position 0 (BOS) is dropped by default
    tokens = store.tokens[:]
    bos = store.header.tokenizer.bos_token_id
    assert store.header.excluded_tokens == (bos,)
    assert not (tokens[contexts, positions] == bos).any()  # separators inside contexts are not stored
    expected_rows = ((tokens[np.unique(contexts)] != bos)[:, 1:]).sum()
    outliers = store.running_stats("train", HOOKS[0]).outlier_rows + store.running_stats("train", HOOKS[1]).outlier_rows
    assert store.n_rows("train") <= expected_rows <= store.n_rows("train") + outliers
    assert not np.array_equal(contexts[:31], np.repeat(contexts[0], 31))  # rows are shuffled
    assert (tokens[:, 0] == bos).all()
    model = load_host_model("tiny-random")
    picks = np.random.default_rng(0).choice(store.n_rows("train"), 12, replace=False)
    for hook in HOOKS:
        norm = store.normalization(hook)
        stored = store.read_rows("train", hook)
        ctx_tokens = torch.from_numpy(tokens[contexts[picks]].astype(np.int64))
        raw = run_to_hooks(model, ctx_tokens, [hook])[hook]
        expected = raw[torch.arange(len(picks)), torch.from_numpy(positions[picks].astype(np.int64))]
        normalized = norm.apply(expected.float())[0].numpy().astype(np.float16)
        np.testing.assert_array_equal(stored[picks], normalized)
    # eval rows never share a context with training rows
    eval_contexts, _ = store.read_mapping("eval")
    assert not set(np.unique(eval_contexts)) & set(np.unique(contexts))
    assert set(np.unique(eval_contexts)) == set(store.contexts("eval"))


def test_resume_after_kill_9_is_bit_identical(tmp_path):
    args = cli_args(*HOOKS, tokens=60000)
    cmd = [sys.executable, "-m", "pipeline.cli", "collect", *args]
    subprocess.run(cmd + ["--out", str(tmp_path / "whole.zarr")], check=True, capture_output=True)

    cut = tmp_path / "cut.zarr"
    proc = subprocess.Popen(cmd + ["--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        meta = cut / "zarr.json"
        if meta.exists():
            try:
                committed = json.loads(meta.read_text())["attributes"]["saepipe"]["progress"]["train"]["rows_committed"]
            except (json.JSONDecodeError, KeyError):
                committed = 0
            if committed >= 3 * 620:  # a few blocks in, mid-run
                break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = open_store(cut)
    assert not interrupted.complete, "collect finished before it could be killed: make the test's run longer"
    assert 0 < interrupted.n_rows("train") < open_store(tmp_path / "whole.zarr").n_rows("train")

    resumed = subprocess.run(cmd + ["--out", str(cut)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert tree_bytes(cut) == tree_bytes(tmp_path / "whole.zarr")


def test_a_reader_during_collect_sees_committed_rows_only_never_torn_chunks(tmp_path):
    """While a collect runs in another process, every open of the store reads its committed rows
    (checksums checked) without error, and they are exactly the first rows of the finished store."""
    out = tmp_path / "live.zarr"
    args = [
        *cli_args(HOOKS[0], tokens=40000),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "collect", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    snapshots = []
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if (out / "zarr.json").exists():
            store = open_store(out)  # a fresh open sees the latest commit
            n = store.n_rows("train")
            if n and (not snapshots or snapshots[-1][0] != n):
                snapshots.append((n, store.read_rows("train", HOOKS[0])))
        time.sleep(0.02)
    assert proc.wait(timeout=60) == 0
    final = open_store(out)
    assert final.complete and len(snapshots) >= 3, len(snapshots)  # several commits were read mid-run
    assert any(n < final.n_rows("train") for n, _ in snapshots)
    everything = final.read_rows("train", HOOKS[0])
    for n, rows in snapshots:
        assert len(rows) == n
        np.testing.assert_array_equal(rows, everything[:n])


def test_out_holding_another_configuration_is_refused(tmp_path):
    out = str(tmp_path / "s.zarr")
    collect_stage.run_collect(CollectConfig(out=out, **SMALL))
    before = tree_bytes(Path(out))
    with pytest.raises(
        SaepipeError, match=r"different configuration \(differs in: context_size, tokens\).*--overwrite"
    ):
        collect_stage.run_collect(CollectConfig(out=out, **{**SMALL, "tokens": 7000, "context_size": 16}))
    assert tree_bytes(Path(out)) == before  # nothing touched
    assert collect_stage.plan_action(CollectConfig(out=out, **SMALL)) is PlanAction.DONE
    collect_stage.run_collect(CollectConfig(out=out, **{**SMALL, "tokens": 3000, "overwrite": True}))
    assert open_store(out).header.token_budget == 3000


def test_out_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(SaepipeError, match="exists and is not a saepipe store"):
        collect_stage.run_collect(CollectConfig(out=str(tmp_path / "notes"), **SMALL))
    # --overwrite replaces stores only: a folder of something else, or a file, stays
    (tmp_path / "file.txt").write_text("precious")
    for out in ("notes", "file.txt"):
        with pytest.raises(SaepipeError, match="replaces only stores; remove it yourself"):
            collect_stage.run_collect(CollectConfig(out=str(tmp_path / out), overwrite=True, **SMALL))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"
    assert (tmp_path / "file.txt").read_text() == "precious"


@pytest.fixture
def nan_in_context(monkeypatch):
    """Make the model produce NaN activations for every context whose second token is even."""
    from stages.collect import blocks as host_models  # where collect calls run_to_hooks

    real = host_models.run_to_hooks
    poisoned = []

    def run(model, tokens, hooks, buffers=None):
        acts = real(model, tokens, hooks, buffers)
        bad = tokens[:, 1] % 2 == 0
        poisoned.extend(tokens[bad, :3].tolist())
        for h in hooks:
            acts[h] = acts[h].clone()
            acts[h][bad, 5, 0] = float("nan")
        return acts

    monkeypatch.setattr(host_models, "run_to_hooks", run)
    return poisoned


def test_nonfinite_contexts_are_skipped_and_counted(tmp_path, nan_in_context):
    collect_stage.run_collect(CollectConfig(out=str(tmp_path / "s.zarr"), **SMALL))
    store = open_store(tmp_path / "s.zarr")
    skipped = store.skipped_contexts().tolist()
    assert skipped and len(skipped) == len(nan_in_context)
    for hook in HOOKS:
        rows = store.read_rows("train", hook)
        assert np.isfinite(rows).all()
        stats = store.running_stats("train", hook)
        assert stats.nonfinite_values > 0 and stats.nonfinite_contexts > 0
    contexts, _ = store.read_mapping("train")
    assert not set(contexts.tolist()) & set(skipped)


def test_nonfinite_abort_policy_stops_with_a_clear_error(tmp_path, nan_in_context):
    with pytest.raises(SaepipeError, match="non-finite activations .* --nonfinite skip"):
        collect_stage.run_collect(CollectConfig(out=str(tmp_path / "s.zarr"), **{**SMALL, "nonfinite": "abort"}))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hooks": ("blocks.1.hook_resid_post", "blocks.1.hook_resid_post")}, "given twice"),
        ({"eval_fraction": 0.7}, "--eval-fraction"),
        ({"tokens": 0}, "--tokens must be positive"),
        ({"drop_first": 40}, "--drop-first"),
        ({"overwrite": True, "resume": True}, "exclude each other"),
    ],
)
def test_bad_collect_settings_are_named(tmp_path, change, message):
    with pytest.raises(SaepipeError, match=message):
        collect_stage.run_collect(CollectConfig(out=str(tmp_path / "s.zarr"), **{**SMALL, **change}))
    assert not (tmp_path / "s.zarr").exists()


def test_massive_activation_rows_are_left_out_and_counted(tmp_path, monkeypatch):
    from stages.collect import blocks as host_models  # where collect calls run_to_hooks

    real = host_models.run_to_hooks

    def run(model, tokens, hooks, buffers=None):  # position 7 becomes an attention-sink-like outlier, 300x the norm
        acts = {h: a.clone() for h, a in real(model, tokens, hooks, buffers).items()}
        for h in hooks:
            acts[h][:, 7] *= 300.0
        return acts

    monkeypatch.setattr(host_models, "run_to_hooks", run)
    collect_stage.run_collect(CollectConfig(out=str(tmp_path / "s.zarr"), **SMALL))
    store = open_store(tmp_path / "s.zarr")
    _, positions = store.read_mapping("train")
    assert 7 not in set(positions.tolist()) and len(set(positions.tolist())) == 30
    for hook in HOOKS:
        stats = store.running_stats("train", hook)
        n_contexts = len(np.unique(store.read_mapping("train")[0]))
        assert stats.outlier_rows == n_contexts  # one per context, counted
        assert 0.8 * 64 < stats.mean_sq_norm < 1.5 * 64  # the scale is set by ordinary rows
        assert store.normalization(hook).max_norm is not None


def test_without_outlier_filter_every_stored_position_is_kept(tmp_path):
    collect_stage.run_collect(
        CollectConfig(out=str(tmp_path / "s.zarr"), **{**SMALL, "outlier_factor": None, "exclude_special": False})
    )
    store = open_store(tmp_path / "s.zarr")
    contexts, _ = store.read_mapping("train")
    assert store.n_rows("train") == len(np.unique(contexts)) * 31
    assert store.normalization(HOOKS[0]).max_norm is None and store.header.excluded_tokens == ()
