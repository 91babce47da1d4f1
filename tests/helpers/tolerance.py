"""What "the same rows within fp16 rounding" means in the tests of the two forward paths."""

import torch

FP16_ROUNDING = 2.0**-11  # half a unit in the last place of fp16, relative


def assert_within_fp16_rounding(a: torch.Tensor, b: torch.Tensor, roundings: int = 1, what: str = "") -> None:
    """Every element of `a` within `roundings` fp16 roundings of `b`'s, relative to its row's largest value
    in `b` (rows: the last dimension)."""
    assert a.shape == b.shape, what
    scale = b.abs().amax(dim=-1, keepdim=True)
    assert bool(((a - b).abs() <= roundings * FP16_ROUNDING * scale).all()), (what, float((a - b).abs().max()))
