"""The per-block steps' own checks, on hand-made rows: non-finite values are counted exactly (the row-sum
shortcut only decides whether to count), and a normalized value that float16 cannot hold is refused, one
that rounds to float16's largest is kept."""

import pytest
import torch

from stages.basics.errors import SaepipeError
from stages.collect.blocks import _nonfinite_values, _to_fp16


def test_nonfinite_values_are_counted_at_stored_positions_only():
    acts = {"a": torch.zeros(3, 4, 5), "b": torch.ones(3, 4, 5)}
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert _nonfinite_values(acts, ["a", "b"], mask) is None  # a clean batch: nothing to count
    acts["a"][1, 2, :2] = torch.tensor([float("inf"), float("nan")])
    acts["b"][2, 0, 4] = -float("inf")
    acts["b"][0, 3, :] = float("nan")
    mask[0, 3] = False  # not a stored position: its NaNs do not count
    counts = _nonfinite_values(acts, ["a", "b"], mask)
    assert counts.tolist() == [[0, 2, 0], [0, 0, 1]]
    huge = {"a": torch.full((1, 2, 4), 3e38)}  # finite values whose row sum overflows: suspect, then cleared
    assert _nonfinite_values(huge, ["a"], torch.ones(1, 2, dtype=torch.bool)).tolist() == [[0]]


def test_the_fp16_cast_refuses_what_would_overflow():
    kept = _to_fp16(torch.tensor([[65519.99, -65519.99, 1.0]]), "h")
    assert kept.tolist() == [[65504.0, -65504.0, 1.0]]
    for value in (65520.0, -65520.0, float("nan")):
        with pytest.raises(SaepipeError, match="overflow float16"):
            _to_fp16(torch.tensor([[0.5, value]]), "h")
