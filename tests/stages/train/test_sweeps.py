"""Sweep axes are typed like the settings they vary, the architectures' own included."""

import pytest

from stages.basics.errors import SaepipeError
from stages.train import TrainConfig
from stages.train.sweeps import expand, parse_axes, sweepable


def test_axes_are_typed_like_their_settings():
    axes = parse_axes(["k=16,32", "l1_coef=0.1", "adam_betas=0.9/0.99,0.8/0.9", "groups=8/64", "ghost_grads=true"])
    assert axes == {"k": [16, 32], "l1_coef": [0.1], "adam_betas": [(0.9, 0.99), (0.8, 0.9)], "groups": [(8, 64)],
                    "ghost_grads": [True]}  # fmt: skip
    with pytest.raises(SaepipeError, match="--sweep groups: cannot read '8/x' as"):
        parse_axes(["groups=8/x"])


def test_every_architecture_setting_is_sweepable_and_reaches_the_settings():
    assert {"k", "aux_k", "groups", "l1_coef", "target_l0", "max_iterations"} <= set(sweepable())
    base = TrainConfig.from_flat(store="s", out="sweep", arch="topk", width=64)
    cfgs = expand(base, {"k": [4, 8]})
    assert [c.settings.k for c in cfgs] == [4, 8] and [c.out for c in cfgs] == ["sweep/k=4", "sweep/k=8"]
    with pytest.raises(SaepipeError, match="--l1-coef does not apply to --arch topk"):
        expand(base, {"l1_coef": [0.1]})
