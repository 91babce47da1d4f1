"""`run_eval_set`: a set of per-layer transcoders (one run per layer, trained on one store) evaluated together:
each layer's own reconstruction and sparsity, and CE loss and KL with all of them spliced in for their
MLP outputs at once, as a replacement model uses them. Writes OUT/set_eval.json.

Definitions: docs/metrics.md#a-set-of-per-layer-transcoders
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.basics import run_dir
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError, require
from stages.basics.settings import device_setting, progress_setting, setting
from stages.evaluate.downstream import load_eval_model
from stages.evaluate.evaluated import check_compatible, open_evaluated
from stages.evaluate.multi_hook import transcoder_set_downstream_metrics
from stages.evaluate.reconstruction import store_metrics
from stages.host_model.model import hook_layer
from store_schema.reader import open_store

SET_EVAL = "set_eval.json"
PER_LAYER_KEYS = ("fve", "raw_fve", "l0", "dead_fraction")


@dataclass
class EvalSetConfig:
    runs: tuple[str, ...]  # transcoder run folders, one per layer
    out: str = setting(help="folder for set_eval.json")
    store: str | None = setting(None, "the store to evaluate on", shown_default="the store the runs were trained on")
    model: str | None = setting(None, "the host model for CE/KL", shown_default="the store's model")
    tokens: int = setting(4096, "at most this many held-out tokens")
    splice_from: int = setting(0, "splice the transcoders in only at positions >= this one")
    device: str = device_setting()
    progress: bool = progress_setting()

    def validate(self) -> EvalSetConfig:
        require(len(self.runs) > 0, "pass the transcoder run folders to evaluate together")
        require(self.tokens >= 1, f"--tokens must be at least 1, got {self.tokens}")
        return self


def run_eval_set(cfg: EvalSetConfig) -> dict:
    cfg.validate()
    device = resolve_device(cfg.device)
    transcoders, fingerprints = [], {}
    for run in cfg.runs:
        evaluated = open_evaluated(run, device, cfg.store)
        config = run_dir.load_config(Path(run))
        if not (evaluated.io.single and evaluated.io.transcodes):
            raise SaepipeError(f"{run} is a {config['sae']['arch']} run: eval-set splices transcoders, one per layer")
        fingerprints[run] = config["store"]["fingerprint"]
        transcoders.append((hook_layer(evaluated.hook), run, evaluated, config))
    if len(set(fingerprints.values())) > 1 and cfg.store is None:
        raise SaepipeError(
            f"the runs were trained on different stores ({', '.join(sorted(set(fingerprints.values())))}): a "
            f"set is evaluated on one store; pass --store to evaluate them all on one"
        )
    transcoders.sort(key=lambda t: t[0])
    layers = [layer for layer, *_ in transcoders]
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    require(not repeated, f"several runs write layer {', '.join(map(str, repeated))}'s MLP output: pass one per layer")
    store = open_store(cfg.store or transcoders[0][2].store_path)
    store.require_complete()
    for _, _, evaluated, _ in transcoders:
        check_compatible(evaluated, store)

    per_layer: dict[str, list] = {"layer": layers, "run": [run for _, run, *_ in transcoders]}
    for _, _, t, _ in transcoders:
        metrics, _ = store_metrics(
            t.sae, store, t.hook, t.normalization, device, cfg.tokens, cfg.progress, read_hook=t.read_hook
        )
        for key in PER_LAYER_KEYS:
            per_layer.setdefault(key, []).append(metrics[key])
    host = load_eval_model(store, cfg.model, device)
    result = {
        "store": store.location,
        "store_fingerprint": store.fingerprint,
        "per_layer": per_layer,
        **transcoder_set_downstream_metrics(
            [t for _, _, t, _ in transcoders], store, host, device, cfg.tokens, cfg.splice_from, cfg.progress
        ),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir.write_json_atomic(out / SET_EVAL, result)
    return result


def format_set_table(result: dict) -> str:
    layers = result["per_layer"]
    lines = [f"{'layer':>6}{'fve':>10}{'raw_fve':>10}{'l0':>8}{'dead':>8}", "-" * 42]
    for i, layer in enumerate(layers["layer"]):
        lines.append(
            f"{layer:>6}{layers['fve'][i]:>10.4f}{layers['raw_fve'][i]:>10.4f}{layers['l0'][i]:>8.1f}"
            f"{layers['dead_fraction'][i]:>8.3f}"
        )
    lines.append("-" * 42)
    for key in ("ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl", "delta_loss"):
        lines.append(f"{key:<16}{result[key]:>14.5g}")
    lines.append(f"{'ce/kl tokens':<16}{result['downstream_tokens']:>14,}")
    return "\n".join(lines)
