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
