"""`run_eval`: evaluate a run folder (or a SAELens SAE) and write eval.json; the table eval prints."""

from __future__ import annotations

import math
from pathlib import Path

from stages.basics import run_dir, tracking
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.evaluate.ablation import ablation_sparsity
from stages.evaluate.absorption import absorption
from stages.evaluate.config import EvalConfig
from stages.evaluate.core_extras import core_extras, saebench_core_keys
from stages.evaluate.downstream import downstream_metrics, held_out_contexts, load_eval_model, positions_kept
from stages.evaluate.evaluated import (
    EvaluatedSAE,
    check_compatible,
    open_evaluated,
    open_external,
    require_store_there,
)
from stages.evaluate.ground_truth import decoder_rows, ground_truth_metrics, load_truth
from stages.evaluate.multi_hook import clt_downstream_metrics, multi_hook_store_metrics
from stages.evaluate.probing import probing_classes, sparse_probing
from stages.evaluate.reconstruction import store_metrics
from stages.saes.base import nonfinite_tensors
from stages.text.probing_tasks import probing_data
from store_schema.lock import StoreLock
from store_schema.reader import open_store


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate the run folder cfg.run (or, with cfg.external, a SAELens SAE folder, writing into cfg.run)
    and write eval.json and the per-latent firing fractions there. The run folder's lock is held throughout,
    as training holds it: a `train --overwrite` (or a second eval) of the same folder waits its turn instead
    of leaving an eval.json of the old weights beside the new ones."""
    cfg.validate()
    fix = "eval writes eval.json into it: copy the run folder somewhere writable and evaluate the copy"
    with StoreLock(cfg.run, kind="run folder", read_only_fix=fix):
        return _run_eval(cfg)


def _run_eval(cfg: EvalConfig) -> dict:
    run_path = Path(cfg.run)
    dev = resolve_device(cfg.device)
    if cfg.external is not None:
        evaluated = _open_external_into(cfg, run_path, dev)
    else:
        evaluated = open_evaluated(run_path, dev, cfg.store)
    _require_finite_weights(evaluated)
    if cfg.store is None:
        require_store_there(evaluated.store_path, run_path)
    store = open_store(evaluated.store_path)
    store.require_complete()
    check_compatible(evaluated, store)
    if cfg.splice_from < 0 or cfg.splice_from >= store.context_size:
        raise SaepipeError(f"--splice-from {cfg.splice_from} is outside the context (0 to {store.context_size - 1})")
    if cfg.use_model and (evaluated.io.single or evaluated.io.transcodes):  # CE and KL will be measured
        _require_a_position_to_splice(store, cfg.splice_from)
    suites = _applicable_suites(cfg, evaluated)
    probing = None  # the probing texts, read before any other work so that bad data is refused at once
    if "probing" in suites:
        probing = probing_data(cfg.probe_data, cfg.probe_text_column, cfg.probe_label_column)
        probing_classes(probing)  # two classes or more
    truth = None  # the planted directions, read before any other work too
    if "ground-truth" in suites:
        truth = load_truth(cfg.truth, decoder_rows(evaluated.sae).shape[1])
    sae, norm, hook = evaluated.sae, evaluated.normalization, evaluated.hook
    read_hook = evaluated.read_hook  # a transcoder's input hook; `hook` is the one it writes
    result = {
        "run": str(run_path),
        "store": store.location,
        "store_fingerprint": store.fingerprint,
        "hook": hook,
        **({"in_hook": read_hook} if read_hook is not None else {}),
        "sae": sae.config(),
    }
    if not evaluated.io.single:  # a crosscoder or a CLT
        result |= _multi_hook_metrics(cfg, evaluated, store, dev)
        density = result.pop("density")
    else:
        metrics, density = store_metrics(sae, store, hook, norm, dev, cfg.tokens, cfg.progress, read_hook=read_hook)
        result |= metrics
    _require_finite_metrics(result, run_path, store.location)
    if "core" in suites:
        result |= core_extras(sae) | saebench_core_keys(sae, density)
    if truth is not None:
        result["ground_truth"] = ground_truth_metrics(sae, truth)
    if cfg.use_model and evaluated.io.single:
        host = load_eval_model(store, cfg.model, dev)
        read = None if read_hook is None else (read_hook, evaluated.read_normalization)
        result |= downstream_metrics(
            sae, store, hook, norm, host, dev, cfg.tokens, cfg.splice_from, progress=cfg.progress, read=read
        )
        if probing is not None:
            result["probing"] = sparse_probing(evaluated, store, host, probing, dev, progress=cfg.progress)
        if "absorption" in suites:
            bos = store.header.tokenizer.bos_token_id
            result["absorption"] = absorption(
                evaluated, host, bos, dev, max_words=cfg.absorption_words, progress=cfg.progress
            )
        # Latent ablation measures how sparse an SAE's effect on the logits is; for transcoders it is
        # not defined yet.
        if cfg.ablation_contexts > 0 and not evaluated.io.transcodes:
            ids = held_out_contexts(store, None)[: cfg.ablation_contexts]
            token_rows = store.tokens.oindex[ids.tolist(), :]
            result |= ablation_sparsity(
                sae, norm, host, token_rows, positions_kept(store, token_rows), hook, progress=cfg.progress
            )
    run_dir.save_npy_atomic(run_path / run_dir.FEATURE_DENSITY, density)
    run_dir.write_json_atomic(run_path / run_dir.EVAL, result)
    tracking.log_eval(run_path, result)  # into the run's wandb run, when it was trained with --wandb
    return result


def _require_a_position_to_splice(store, splice_from: int) -> None:
    """CE and KL score the next-token predictions made from stored positions at or after --splice-from;
    the last position predicts nothing. A store whose only stored position is the last has none."""
    kept, last = len(store.header.dropped_positions), store.context_size - 1
    if max(splice_from, kept) < last:
        return
    if kept < last:
        fix = f"pass a --splice-from below {last}"
    else:
        fix = "evaluate with --no-model, or collect longer contexts (--context-size)"
    raise SaepipeError(
        f"no position can be spliced: the store keeps positions {kept} to {last} of its "
        f"{store.context_size}-token contexts, --splice-from is {splice_from}, and the last position predicts "
        f"no next token; {fix}"
    )


def _require_finite_weights(evaluated: EvaluatedSAE) -> None:
    """Refuse an SAE whose weights hold NaN or inf before any work: every metric would be NaN."""
    bad = nonfinite_tensors(evaluated.sae.state_dict())
    if bad:
        raise SaepipeError(
            f"the SAE of {evaluated.path} holds non-finite weights ({', '.join(bad)}): its training diverged; "
            f"train it again (a lower --lr, or a store that passes `saepipe store verify`)"
        )


def _require_finite_metrics(result: dict, run_path: Path, store: str) -> None:
    """The store's reconstruction metrics of a finite SAE are finite unless the rows are not: then nothing is
    written (an eval.json already there stays as it was)."""
    bad = sorted(key for key, value in result.items() if isinstance(value, float) and not math.isfinite(value))
    if bad:
        raise SaepipeError(
            f"evaluating {run_path} on {store} gives non-finite {', '.join(bad)}: the store's rows hold NaN or inf "
            f"(run `saepipe store verify {store}`); nothing was written"
        )


def _applicable_suites(cfg: EvalConfig, evaluated: EvaluatedSAE) -> set[str]:
    """The extra evaluations to run: `--suite all` keeps those that apply to this run; one named that does
    not apply is refused (probing and absorption read one hook; absorption probes the hook an SAE writes)."""
    arch = evaluated.sae.arch
    inapplicable = {}
    if not evaluated.io.single:
        inapplicable |= {suite: f"it reads one hook; a {arch} reads several" for suite in ("probing", "absorption")}
    elif evaluated.io.transcodes:
        inapplicable["absorption"] = f"it probes the hook an SAE reconstructs; a {arch} writes another"
    if evaluated.sae.n_layers:
        inapplicable["ground-truth"] = f"it compares decoder rows; a {arch} has one decoder per layer"
    named = {name.strip() for name in cfg.suite.split(",")}
    if "all" in named:
        return cfg.suites - set(inapplicable)
    for suite in cfg.suites & set(inapplicable):
        raise SaepipeError(f"--suite {suite} does not apply here: {inapplicable[suite]}")
    return cfg.suites


def _multi_hook_metrics(cfg: EvalConfig, evaluated: EvaluatedSAE, store, device) -> dict:
    """A crosscoder's or CLT's metrics: per written hook, and (a CLT, with the model) CE/KL with every layer
    spliced at once. A crosscoder has no downstream metric: it reads the hooks a splice would change, where
    a CLT reads others than it writes."""
    in_hooks, out_hooks, norms = evaluated.io.reads, evaluated.io.writes, evaluated.normalizations
    sae = evaluated.sae
    result = {"in_hooks": list(in_hooks), "out_hooks": list(out_hooks)}
    metrics, density = multi_hook_store_metrics(
        sae, store, in_hooks, out_hooks, norms, device, cfg.tokens, cfg.progress
    )
    result |= metrics | {"density": density}
    if cfg.use_model and evaluated.io.transcodes:
        host = load_eval_model(store, cfg.model, device)
        result |= clt_downstream_metrics(
            sae, store, in_hooks, out_hooks, norms, host, device, cfg.tokens, cfg.splice_from, cfg.progress
        )
    return result


def _open_external_into(cfg: EvalConfig, run_path: Path, device) -> EvaluatedSAE:
    """The SAELens SAE at cfg.external, recorded in run_path (external.json) for report and compare."""
    if cfg.store is None:
        raise SaepipeError("--external needs --store: the store to evaluate the SAE on")
    if (run_path / run_dir.CONFIG).exists():
        raise SaepipeError(f"{run_path} is a training run: give --external another folder to write into")
    evaluated = open_external(cfg.external, cfg.store, run_path, device)
    run_path.mkdir(parents=True, exist_ok=True)
    run_dir.write_json_atomic(
        run_path / run_dir.EXTERNAL, {"saelens_dir": str(Path(cfg.external).resolve()), "store": evaluated.store_path}
    )
    return evaluated


TABLE_KEYS = (
    "mse",
    "nmse",
    "fve",
    "fve_per_token",
    "fve_vs_zero",
    "cosine",
    "l2_ratio",
    "relative_reconstruction_bias",
    "raw_mse",
    "raw_fve",
    "raw_cosine",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_recovered",
    "kl",
    "kl_div_score",
    "delta_loss",
    "ablation_sparsity",
    "decoder_max_cosine_mean",
    "duplicate_fraction",
    "encoder_decoder_cosine_mean",
)


def format_eval_table(result: dict) -> str:
    lines = [f"{'metric':<30}{'value':>14}", "-" * 44]
    for key in TABLE_KEYS:
        if result.get(key) is not None:  # None: not defined here (no latent's ablation moved a logit)
            lines.append(f"{key:<30}{result[key]:>14.5g}")
    if "l0_quantiles" in result:
        q = result["l0_quantiles"]
        lines.append(f"{'l0 p10 / p50 / p90':<30}{q['p10']:>6} /{q['p50']:>3} /{q['p90']:>3}")
    for hook, metrics in result.get("per_hook", {}).items():  # a crosscoder's or CLT's written hooks
        lines.append(f"{'fve ' + hook:<30}{metrics['fve']:>14.5g}")
    layers = result.get("per_layer")
    if layers:
        lines.append(f"{'l0 per layer':<30}{' '.join(f'{v:.1f}' for v in layers['l0']):>14}")
    lines.append(f"{'eval rows':<30}{result['eval_rows']:>14,}")
    if "downstream_tokens" in result:
        lines.append(f"{'ce/kl tokens':<30}{result['downstream_tokens']:>14,}")
    truth = result.get("ground_truth")
    if truth:
        lines.append(f"{'ground truth mcc':<30}{truth['mcc']:>14.5g}")
        lines.append(f"{'ground truth recovered':<30}{truth['recovered_fraction']:>14.5g}")
    absorbed = result.get("absorption")
    if absorbed:
        lines.append(f"{'absorption fraction':<30}{absorbed['mean_absorption_fraction_score']:>14.5g}")
        lines.append(f"{'full absorption':<30}{absorbed['mean_full_absorption_score']:>14.5g}")
        lines.append(f"{'split features':<30}{absorbed['mean_num_split_features']:>14.5g}")
    probing = result.get("probing")
    if probing:
        for key in ("sae_top_1", "sae_top_5", "model_top_1", "model_top_5"):
            lines.append(f"{'probing ' + key:<30}{probing[key + '_accuracy']:>14.5g}")
    if "ablation_count" in result:
        lines.append(f"{'ablations':<30}{result['ablation_count']:>14,}")
    return "\n".join(lines)
