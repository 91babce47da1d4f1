"""Stage three, evaluate: a trained SAE on the store's held-out split (reconstruction, sparsity) and, with
the host model, downstream (CE loss and KL with the SAE spliced in, ablation sparsity)."""

from stages.evaluate.config import EvalConfig
from stages.evaluate.downstream import downstream_metrics, held_out_contexts, load_eval_model
from stages.evaluate.evaluated import EvaluatedSAE, check_compatible, open_evaluated, open_external, run_normalization
from stages.evaluate.reconstruction import store_metrics
from stages.evaluate.run import format_eval_table, run_eval

__all__ = [
    "EvalConfig",
    "EvaluatedSAE",
    "check_compatible",
    "downstream_metrics",
    "format_eval_table",
    "held_out_contexts",
    "load_eval_model",
    "open_evaluated",
    "open_external",
    "run_eval",
    "run_normalization",
    "store_metrics",
]
