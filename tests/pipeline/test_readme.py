"""README.md is a newcomer's page: its CLI block is the commands' own help, and it stays short."""

import re

from tests.helpers import readme


def test_the_readmes_cli_block_is_the_commands_own_help():
    text = readme.README.read_text()
    assert readme.readme_with_block(text) == text, "README.md's CLI block is stale: run `make readme`"


def test_the_cli_block_names_every_command_and_no_harness():
    block = readme.cli_block()
    for name in ("collect", "train", "eval", "report", "store verify", "prepare-model"):
        assert re.search(rf"^saepipe {name} +\S", block, re.M), name
    assert "bench" not in block and "gpu-check" not in block


def test_the_readme_stays_a_short_page_without_history():
    text = readme.README.read_text()
    assert len(text.splitlines()) <= 125
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if not w.isdigit()]
    assert not hashes, f"commit hashes {hashes}: history goes to docs/history.md"
