"""Stage two, train: SAEs from a store's training rows, never touching the host model (loop.py), sweeps
of several SAEs from one pass over the store (sweeps.py), and the SAELens export (saelens_export.py)."""

from stages.train.config import TrainConfig
from stages.train.loop import build_for_store, lr_schedule, run_sweep, run_train

__all__ = ["TrainConfig", "build_for_store", "lr_schedule", "run_sweep", "run_train"]
