"""The resume check every architecture's tests make: a run stopped mid-way and resumed ends bit-identical
to the same run trained in one go."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from stages import train as train_stage
from stages.saes.saved import load_sae
from stages.train.config import TrainConfig


def assert_resume_is_bit_identical(config: Callable[..., TrainConfig], tmp_path: Path, crash_training, **short) -> None:
    """`config(out, **values)` makes the run's TrainConfig; `short`: settings for a short run that
    checkpoints before the crash (after 25 optimizer steps)."""
    train_stage.run_train(config(tmp_path / "whole", **short))
    crash_training.arm(25)
    with pytest.raises(crash_training.Crash):
        train_stage.run_train(config(tmp_path / "resumed", **short))
    crash_training.disarm()
    train_stage.run_train(config(tmp_path / "resumed", resume=True, **short))
    a, _ = load_sae(tmp_path / "whole")
    b, _ = load_sae(tmp_path / "resumed")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
