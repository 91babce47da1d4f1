"""Folders that are not what a command expects: a run's saelens/ export is described and pointed to
--external, not mistaken for an unfinished run; an --out inside a store is refused before anything is
written there."""

from tests.helpers.cli import run_catching, run_ok

TRAIN = ("--width", "32", "--k", "4", "--tokens", "4096", "--batch-size", "256", "--no-progress")


def test_a_runs_saelens_export_is_described_and_evaluated_as_one(tiny_store, tmp_path):
    out = tmp_path / "run"
    run_ok("train", tiny_store, *TRAIN, "--out", out)
    info = run_ok("info", out / "saelens").output
    assert "architecture: topk" in info and f"--external {out / 'saelens'} --store STORE" in info
    result = run_catching("eval", out / "saelens", "--no-model")
    assert (
        result.exit_code == 2 and "is a SAELens SAE folder" in result.output and "did not finish" not in result.output
    )


def test_report_and_train_refuse_an_out_inside_a_store(tiny_store, tmp_path):
    out = tmp_path / "run"
    run_ok("train", tiny_store, *TRAIN, "--out", out)
    run_ok("eval", out, "--no-model", "--no-progress")
    before = sorted(p.relative_to(tiny_store) for p in tiny_store.rglob("*"))
    for command in (("report", out, "--no-model", "--no-progress"), ("train", tiny_store, *TRAIN)):
        result = run_catching(*command, "--out", tiny_store / "inside" / "here")
        assert result.exit_code == 2, result.output
        assert f"is inside the store {tiny_store}" in result.output.strip().splitlines()[-1]
    assert sorted(p.relative_to(tiny_store) for p in tiny_store.rglob("*")) == before


def test_a_sweep_folder_is_pointed_to_its_runs(tiny_store, tmp_path):
    sweep = tmp_path / "sweep"
    run_ok("train", tiny_store, *TRAIN, "--sweep", "k=2,4", "--out", sweep)
    for command in (("eval", sweep, "--no-model"), ("report", sweep, "--no-model", "--out", tmp_path / "report")):
        result = run_catching(*command)
        assert result.exit_code == 2, result.output
        line = result.output.strip().splitlines()[-1]
        assert f"{sweep} is a sweep's folder, which holds one run per setting (k=2, k=4)" in line, line


def test_a_read_only_out_is_one_line(tiny_store, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    out = tmp_path / "run"
    run_ok("train", tiny_store, *TRAIN, "--out", out)
    run_ok("eval", out, "--no-model", "--no-progress")
    report = tmp_path / "report"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == report:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = run_catching("report", out, "--no-model", "--no-progress", "--out", report)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: cannot write {report} (Read-only file system): choose a writable --out, or copy what you are "
        f"working on somewhere writable"
    )


def test_no_progress_silences_the_libraries_bars_too(tiny_llama_dir, tmp_path):
    """transformers draws its own "Loading weights" bar when a model loads: --no-progress hides it too."""
    import os
    import subprocess
    import sys

    from tests.helpers.files import REPO

    def collect(*flags: str) -> str:
        command = [sys.executable, "-m", "pipeline.cli", "collect", "--model", str(tiny_llama_dir[0]), "--hook",
                   "blocks.1.hook_resid_post", "--tokens", "1000", "--context-size", "32", "--out",
                   str(tmp_path / f"s{len(flags)}.zarr"), *flags]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    assert "Loading weights" in collect()  # what there is to hide: the bar shows without the flag
    assert "Loading weights" not in collect("--no-progress")
