"""Each architecture declares what it reads and writes (stages/saes/io.py); the training loop takes that
description and never asks which architecture it trains."""

import pytest

from stages.saes.io import HookIO
from stages.train import TrainConfig

WIDTHS = {"a": 8, "b": 12, "blocks.3.mlp.hook_in": 16, "blocks.3.hook_mlp_out": 16, "blocks.4.mlp.hook_in": 16,
          "blocks.4.hook_mlp_out": 16}  # fmt: skip


def config(arch: str, **hooks) -> TrainConfig:
    return TrainConfig.from_flat(store="s.zarr", out="r", arch=arch, width=32, **hooks).validate()


@pytest.mark.parametrize(
    ("arch", "hooks", "reads", "writes", "shape"),
    [
        ("topk", dict(hook="a"), ("a",), ("a",), (8, {})),
        ("relu", dict(hook="b"), ("b",), ("b",), (12, {})),
        ("transcoder", dict(hook=None, in_hook="a", out_hook="b"), ("a",), ("b",), (8, {"d_out": 12})),
        ("skip_transcoder", dict(hook=None, in_hook="b", out_hook="a"), ("b",), ("a",), (12, {"d_out": 8})),
        ("crosscoder", dict(hook=None, hooks=("a", "b")), ("a", "b"), ("a", "b"), (20, {"hook_widths": [8, 12]})),
        (
            "clt",
            dict(hook=None, layers="3-4"),
            ("blocks.3.mlp.hook_in", "blocks.4.mlp.hook_in"),
            ("blocks.3.hook_mlp_out", "blocks.4.hook_mlp_out"),
            (16, {"d_out": 16, "n_layers": 2}),
        ),
    ],
)
def test_each_architecture_says_what_it_reads_writes_and_is_built_with(arch, hooks, reads, writes, shape):
    cfg = config(arch, **hooks)
    assert cfg.io == HookIO(reads, writes)
    assert cfg.transcodes == cfg.io.transcodes == (reads != writes)
    assert cfg.read_hooks == (reads + writes if reads != writes else reads)
    assert cfg.sae_class.shape_for(cfg.io, WIDTHS.__getitem__) == shape


def test_what_cfg_json_records_of_the_hooks_follows_the_architecture():
    def norm(hook):
        return {"of": hook}

    transcoder = config("transcoder", hook=None, in_hook="a", out_hook="b")
    assert transcoder.sae_class.hook_record(transcoder.io, WIDTHS.__getitem__, norm) == {
        "in_hook": "a", "out_hook": "b", "d_out": 12, "out_normalization": {"of": "b"}
    }  # fmt: skip
    clt = config("clt", hook=None, layers="3-4")
    record = clt.sae_class.hook_record(clt.io, WIDTHS.__getitem__, norm)
    assert record["layers"] == [3, 4] and list(record["normalizations"]) == list(clt.read_hooks)
    assert config("topk", hook="a").sae_class.hook_record(HookIO(("a",), ("a",)), WIDTHS.__getitem__, norm) == {}


def test_the_saelens_format_of_each_architecture():
    assert config("topk", hook="a").sae_class.saelens_format == "sae"
    assert config("transcoder", hook=None, in_hook="a", out_hook="b").sae_class.saelens_format == "transcoder"
    assert config("crosscoder", hook=None, hooks=("a", "b")).sae_class.saelens_format is None
    assert config("clt", hook=None, layers="3-4").sae_class.saelens_format is None
