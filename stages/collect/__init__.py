"""Stage one, collect: run the host model once over packed text and write normalized, shuffled fp16 rows
into a store (stages.collect.run is the entry point; blocks.py holds the steps every orchestrator runs)."""

from stages.collect.config import CollectConfig
from stages.collect.plan import plan_action
from stages.collect.run import run_collect

__all__ = ["CollectConfig", "plan_action", "run_collect"]
