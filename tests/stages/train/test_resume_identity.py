"""--resume continues a run by identity, not by path string: the store named by another path (relative,
through a link) and the run folder copied elsewhere resume; another store or other settings are refused
with what differs."""

import json
import shutil

from stages.basics import run_dir
from stages.train import loop
from tests.helpers.cli import run_catching

TRAIN = ("--width", "32", "--k", "4", "--tokens", "12000", "--batch-size", "256", "--no-progress")


def _interrupted_run(store, out, monkeypatch) -> None:
    """A run stopped after its last checkpoint (its finish fails), so that it resumes from there."""

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "finish", stopped)
    run_catching("train", store, *TRAIN, "--checkpoint-every", "8", "--out", out)
    monkeypatch.undo()
    assert (out / run_dir.CHECKPOINT).exists() and not (out / run_dir.SAE_WEIGHTS).exists()


def test_resume_by_another_path_and_from_a_copied_folder(tiny_store, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    first = tmp_path / "first"
    _interrupted_run(store, first, monkeypatch)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(first, moved)
    (tmp_path / "link.zarr").symlink_to(store)
    monkeypatch.chdir(tmp_path)
    for path in ("./link.zarr", "s.zarr"):
        copy = tmp_path / f"copy-{path.strip('./')}"
        shutil.copytree(moved, copy)
        result = run_catching("train", path, *TRAIN, "--checkpoint-every", "8", "--out", copy, "--resume")
        assert result.exit_code == 0, result.output
        assert json.loads((copy / run_dir.CONFIG).read_text())["finished"] is True


def test_resume_with_other_settings_names_them(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_run(tiny_store, out, monkeypatch)
    other = [a if a != "4" else "8" for a in TRAIN]  # --k 8
    result = run_catching("train", tiny_store, *other, "--checkpoint-every", "8", "--out", out, "--resume")
    assert result.exit_code == 2, result.output
    assert "was trained with other settings (differs in: k)" in result.output.strip().splitlines()[-1]
