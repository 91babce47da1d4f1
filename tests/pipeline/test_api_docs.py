"""docs/python-api.md is tested through its examples: every ```python block runs, in order, in one namespace,
against a tiny store at stores/demo.zarr and a run trained from it at runs/demo (the paths the page uses)."""

import re
from pathlib import Path

import pytest

from tests.helpers.cli import run_ok

PAGE = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.fixture
def demo_folder(tmp_path, tiny_store, monkeypatch):
    (tmp_path / "stores").mkdir()
    (tmp_path / "stores" / "demo.zarr").symlink_to(tiny_store)
    run_ok("train", tiny_store, "--width", "32", "--k", "4", "--tokens", "2048", "--batch-size", "256",
           "--no-progress", "--out", tmp_path / "runs" / "demo")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_page_has_examples_of_every_public_name():
    from pipeline import api

    text = PAGE.read_text()
    assert len(python_blocks(text)) >= 8
    for name in api.__all__:
        assert f"`{name}" in text, f"docs/python-api.md does not mention {name}"


def test_every_example_runs_in_order(demo_folder, capsys):
    namespace: dict = {"__name__": "docs_python_api"}
    for number, block in enumerate(python_blocks(PAGE.read_text()), 1):
        try:
            exec(compile(block, f"docs/python-api.md block {number}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"docs/python-api.md example {number} failed: {type(e).__name__}: {e}\n{block}") from e
    printed = capsys.readouterr().out
    assert "<saepipe Store>" in printed and "rows in one epoch" in printed
    # The recipes trained for real: their modules moved away from their initial weights.
    assert namespace["trainer"].n_training_steps == 10
    assert namespace["dl_trainer"].scheduler.last_epoch == 10 and namespace["ae"].b_dec.abs().sum() > 0
