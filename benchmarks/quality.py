"""Side-by-side quality: our SAEs against SAELens's, trained on the very same activation rows.

For each architecture both are trained from one store with the same width, the same target L0, the
same token budget, the same batches in the same order (our loader feeds SAELens's trainer) and the same
learning-rate schedule, then both are measured by our eval (held-out reconstruction, CE/KL with the
SAE spliced into the model), and, with the model, by the interpretability evaluations (absorption and
k-sparse probing, each built once and run on every SAE). SAELens runs with its own defaults otherwise:
that is what its users get. Both sides' L0 during training is kept (`l0_curve`) and drawn
(`l0_curves.png`): it shows whether an architecture reached its target L0 within the budget.
Needs sae-lens (a test dependency): `pip install 'saepipe[test]'`. `--dictionary-learning` adds
dictionary_learning's TopK trainer, fed the same batches (installed as docs/python-api.md says).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from stages import evaluate
from stages.basics import run_dir
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.basics.settings import setting
from stages.evaluate.absorption import FirstLetterTask, absorption_scores, first_letter_task
from stages.evaluate.probing import K_VALUES, ProbingTexts, probing_classes, probing_scores, probing_texts
from stages.saes.base import DenseCode, SparseAutoencoder
from stages.saes.external import ExternalSAE
from stages.text.probing_tasks import STDLIB_PACKAGE, probing_data
from stages.train import run_train
from stages.train.config import TrainConfig, only_hook
from store_schema.loader import ShuffledBatches
from store_schema.reader import open_store

# sae_lens is optional (the test extra): imported by the functions that train or load its SAEs.

# eval.json's metrics, then the interpretability ones (absorption, probing) and training speed
METRICS = ("fve", "nmse", "l0", "dead_fraction", "ce_recovered", "kl")
INTERPRETABILITY = ("absorption", "full_absorption", "probe_top_1", "probe_top_2", "probe_top_5")
TABLE_COLUMNS = ("fve", "l0", "dead_fraction", "ce_recovered", "kl", *INTERPRETABILITY, "tokens_per_s")
COUNTERPARTS = ("topk", "batchtopk", "matryoshka", "jumprelu", "mp")  # the architectures SAELens trains too


def matryoshka_groups(base: TrainConfig) -> tuple[int, ...]:
    """The matryoshka prefix sizes both sides use: the base's groups, else width/8, width/2, width."""
    groups = base.flat()["groups"]
    return tuple(groups) if groups else (base.width // 8, base.width // 2, base.width)


def _ours_config(base: TrainConfig, arch: str, k: int) -> TrainConfig:
    """Our config for `arch` at (about) k active latents per token."""
    extra = {"target_l0": float(k)} if arch == "jumprelu" else {"k": k}
    if arch == "matryoshka":
        extra["groups"] = matryoshka_groups(base)
    return base.replaced(arch=arch, out=str(Path(base.out) / f"ours-{arch}"), overwrite=True, **extra)


def saelens_training_sae(arch: str, d_in: int, width: int, k: int, device: str, groups=()):
    """SAELens's training SAE for `arch` at (about) k active latents, acting on our normalized rows."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitTrainingSAE, MatchingPursuitTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=width, dtype="float32", device=device, normalize_activations="none")
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **common))
    if arch == "matryoshka":
        config = MatryoshkaBatchTopKTrainingSAEConfig(k=k, matryoshka_widths=list(groups), **common)
        return MatryoshkaBatchTopKTrainingSAE(config)
    if arch == "jumprelu":
        return JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(jumprelu_sparsity_loss_mode="quadratic", target_l0=float(k), **common)
        )
    if arch == "mp":  # exactly k selections, like our static matching pursuit
        return MatchingPursuitTrainingSAE(
            MatchingPursuitTrainingSAEConfig(
                residual_threshold=0.0, max_iterations=k, stop_on_duplicate_support=False, **common
            )
        )
    raise SaepipeError(f"no SAELens counterpart for --arch {arch}: compare {', '.join(COUNTERPARTS)}")


def _train_saelens(cfg: TrainConfig, arch: str, k: int, store, device):
    """(SAELens's trained SAE, its training wall seconds, its L0 curve [(tokens, l0)])."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = saelens_training_sae(arch, store.width(cfg.hook), cfg.width, k, str(device), matryoshka_groups(cfg))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.resolved_lr(),
        lr_end=0.0,
        lr_warm_up_steps=int(cfg.steps * cfg.warmup_frac),
        lr_decay_steps=int(cfg.steps * cfg.decay_frac),
        device=str(device),
        dead_feature_window=max(1, (cfg.dead_window_tokens or min(10_000_000, cfg.tokens // 4)) // cfg.batch_size),
    )
    curve: list[tuple[int, float]] = []
    with _our_batches(cfg, store, device) as batches:
        started = time.perf_counter()
        trained = SAETrainer(trainer_cfg, sae, _recording_l0(batches, sae, cfg.log_every, curve)).fit()
    return trained, time.perf_counter() - started, curve


def _recording_l0(batches, sae, every: int, curve: list):
    """`batches`, passed on; every `every` batches, before the SAE trains on one, the L0 its inference code
    gives on that batch is appended to `curve` as (tokens once it has trained on it, mean L0). Encoding
    changes no state (BatchTopK's threshold moves in its training forward only)."""
    tokens = 0
    for step, batch in enumerate(batches, 1):
        tokens += len(batch)
        if step % every == 0:
            curve.append((tokens, _saelens_inference_l0(sae, batch)))
        yield batch


@torch.no_grad()
def _saelens_inference_l0(sae, batch: torch.Tensor) -> float:
    """The mean L0 of the SAE a SAELens user will load: a BatchTopK (Matryoshka too) is saved as a JumpReLU
    at its running `topk_threshold`, in the units of its (decoder-norm rescaled) pre-activations; the
    others' training encode is already their inference rule."""
    if hasattr(sae, "topk_threshold"):
        _, pre = sae.encode_with_hidden_pre(batch)
        return float((pre > sae.topk_threshold).sum(dim=-1).float().mean())
    return float((sae.encode(batch) != 0).sum(dim=-1).float().mean())


def our_l0_curve(run: Path) -> list[tuple[int, float]]:
    """Our run's L0 as train_log.jsonl records it: (tokens so far, the logging window's mean L0), the L0 of
    its inference rule where that differs from training's (BatchTopK's threshold)."""
    return [(record["tokens"], record.get("inference_l0", record["l0"])) for record in run_dir.read_log(run)]


@contextlib.contextmanager
def _our_batches(cfg: TrainConfig, store, device):
    """The batches our training reads, in its order (its loader, seed and residency), for another trainer."""
    loader = ShuffledBatches(store, cfg.hook, cfg.batch_size, device=device, seed=cfg.seed, resident=cfg.resident)
    batches = loader.batches(0)
    try:
        yield batches
    finally:
        batches.close()


@dataclass
class QualityConfig:
    """What the comparison runs, beside the training settings both sides share (a TrainConfig)."""

    archs: str = setting(",".join(COUNTERPARTS), "architectures to compare (comma-separated)")
    k: int = setting(32, "the L0 both implementations are trained to")
    eval_tokens: int = setting(4096, "held-out tokens for every metric")
    use_model: bool = setting(
        True, "store-only metrics (no CE/KL, absorption or probing)", flag="--no-model", inverted=True
    )
    interpretability: bool = setting(
        True, "skip absorption and k-sparse probing (they need the model)", flag="--no-interpretability", inverted=True
    )
    absorption_words: int = setting(4000, "letter-only tokens sampled for absorption (80% train, 20% test)")
    probe_data: str = setting(STDLIB_PACKAGE, "k-sparse probing's task (as saepipe eval's --probe-data)")
    dictionary_learning: bool = setting(
        False, "also train dictionary_learning's TopK trainer on the same rows (needs topk in --archs)"
    )


def compare_with_saelens(base: TrainConfig, cfg: QualityConfig) -> list[dict]:
    k, eval_tokens, use_model = cfg.k, cfg.eval_tokens, cfg.use_model
    archs = [arch.strip() for arch in cfg.archs.split(",") if arch.strip()]
    if not archs:
        raise SaepipeError(f"--archs names no architecture: pass some of {','.join(COUNTERPARTS)}")
    for arch in archs:  # every configuration is checked before the first training starts
        if arch not in COUNTERPARTS:
            raise SaepipeError(f"--archs {arch}: no SAELens counterpart; compare {', '.join(COUNTERPARTS)}")
        _ours_config(base, arch, k).validate()
    if cfg.dictionary_learning:
        if "topk" not in archs:
            raise SaepipeError("--dictionary-learning compares its TopK trainer: include topk in --archs")
        _import_dictionary_learning()
    probing = None  # the probing texts, read (and bad data refused) before any training
    if use_model and cfg.interpretability:
        probing = probing_data(cfg.probe_data)
        probing_classes(probing)
    store = open_store(base.store)
    if base.hook is None:
        base = dataclasses.replace(base, hook=only_hook(store.hooks))
    store.require_complete()
    device = resolve_device(base.device)
    norm = store.normalization(base.hook)
    out = Path(base.out)
    tokens = base.steps * base.batch_size
    trained: list[tuple[dict, SparseAutoencoder]] = []  # every row with its SAE, for the evaluations after
    host = None  # the model for CE/KL, loaded once for every SAE scored outside run_eval

    def score(sae) -> dict:
        """Our eval's metrics of an SAE trained elsewhere, on the same held-out rows and contexts."""
        nonlocal host
        metrics, _ = evaluate.store_metrics(sae, store, base.hook, norm, device, eval_tokens, base.progress)
        if use_model:
            host = host or evaluate.load_eval_model(store, None, device)
            metrics |= evaluate.downstream_metrics(
                sae, store, base.hook, norm, host, device, eval_tokens, progress=base.progress
            )
        return _pick(metrics)

    tasks = None  # the model's side of absorption and probing: built before training, so a failure comes first
    if probing is not None:
        host = evaluate.load_eval_model(store, None, device)
        bos = store.header.tokenizer.bos_token_id
        letters = first_letter_task(host, base.hook, bos, device, cfg.absorption_words, base.seed, base.progress)
        texts = probing_texts(base.hook, norm, store, host, probing, device, base.seed, base.progress)
        tasks = (letters, texts, norm, device)

    for arch in archs:
        ours_cfg = _ours_config(base, arch, k)
        ours, ours_wall = train_and_evaluate(ours_cfg, eval_tokens, use_model)
        row = {"arch": arch, "impl": "saepipe", **_pick(ours), **_speed(tokens, ours_wall)}
        row["l0_curve"] = our_l0_curve(Path(ours_cfg.out))
        trained.append((row, evaluate.open_evaluated(ours_cfg.out, device).sae))

        theirs_training, theirs_wall, curve = _train_saelens(base, arch, k, store, device)
        theirs = ExternalSAE(_inference_model(theirs_training, out / f"saelens-{arch}", device))
        impl = f"sae-lens {_installed_saelens_version()}"
        trained.append(
            ({"arch": arch, "impl": impl, **score(theirs), **_speed(tokens, theirs_wall), "l0_curve": curve}, theirs)
        )
        if arch == "topk" and cfg.dictionary_learning:
            ae, dl_wall = _train_dictionary_learning(base, k, store, device)
            dl = DictionaryLearningSAE(ae)
            impl = f"dictionary_learning {version('dictionary-learning')}"
            trained.append(({"arch": arch, "impl": impl, **score(dl), **_speed(tokens, dl_wall)}, dl))
    summary = {} if tasks is None else _interpretability(trained, *tasks, base.progress)
    rows = [row for row, _ in trained]
    run_dir.write_json_atomic(
        out / "quality.json",
        {
            "store": base.store,
            "width": base.width,
            "k": k,
            "tokens": tokens,
            "batch_size": base.batch_size,
            **summary,
            "rows": rows,
        },
    )
    (out / "quality.md").write_text(format_quality_table(rows) + "\n")
    plot_l0_curves(rows, k, out / "l0_curves.png")
    return rows


def _interpretability(trained, letters: FirstLetterTask, texts: ProbingTexts, norm, device, progress: bool) -> dict:
    """Absorption and k-sparse probing of every trained SAE, into its row (the model's side of each built
    once: only the SAEs differ). Returns what the model alone scores (probing on its own dimensions)."""
    probed = absorbed = {}
    for row, sae in tqdm(trained, desc="absorption and probing", disable=not progress):
        absorbed = absorption_scores(sae, norm, letters, device)
        probed = probing_scores(sae, norm, texts, device)
        row["absorption"] = absorbed["mean_absorption_fraction_score"]
        row["full_absorption"] = absorbed["mean_full_absorption_score"]
        row |= {f"probe_top_{k}": probed[f"sae_top_{k}_accuracy"] for k in K_VALUES}
        row["split_features"] = absorbed["mean_num_split_features"]
    return {
        "absorption_letters": absorbed["letters"],
        "absorption_words": absorbed["words"],
        "probing_task": probed["task"],
        "probing_texts": probed["texts"],
        "probing_model": {f"top_{k}": probed[f"model_top_{k}_accuracy"] for k in K_VALUES},
    }


def _speed(tokens: int, wall: float) -> dict:
    return {"tokens_per_s": tokens / wall, "wall_s": wall}


def train_and_evaluate(cfg: TrainConfig, eval_tokens: int, use_model: bool) -> tuple[dict, float]:
    """Our run of `cfg`, trained and evaluated (without ablation sparsity): (eval.json's metrics, training
    wall seconds)."""
    started = time.perf_counter()
    run_train(cfg)
    wall = time.perf_counter() - started
    eval_cfg = evaluate.EvalConfig(
        cfg.out, tokens=eval_tokens, use_model=use_model, device=cfg.device, ablation_contexts=0, progress=cfg.progress
    )
    return evaluate.run_eval(eval_cfg), wall


def _import_dictionary_learning():
    try:
        from dictionary_learning.trainers.top_k import TopKTrainer
    except ImportError as e:
        raise SaepipeError(
            f"--dictionary-learning needs dictionary-learning ({e}): pip install --no-deps "
            f"dictionary-learning==0.1.0 nnsight==0.3.7 python-socketio (docs/python-api.md says why)"
        ) from None
    return TopKTrainer


def _train_dictionary_learning(cfg: TrainConfig, k: int, store, device):
    """dictionary_learning's TopKTrainer fed the batches ours and SAELens's get, with the same lr and the
    same warm-up and decay lengths (its schedule: linear warm-up, then linear decay to 0 from decay_start)."""
    trainer_class = _import_dictionary_learning()
    warmup = max(1, int(cfg.steps * cfg.warmup_frac))
    decay = int(cfg.steps * cfg.decay_frac)
    trainer = trainer_class(
        steps=cfg.steps, activation_dim=store.width(cfg.hook), dict_size=cfg.width, k=k, layer=0,
        lm_name=store.header.model.name, lr=cfg.resolved_lr(), warmup_steps=warmup,
        decay_start=cfg.steps - decay if decay and cfg.steps - decay > warmup else None,
        seed=cfg.seed, device=str(device),
    )  # fmt: skip
    with _our_batches(cfg, store, device) as batches:
        started = time.perf_counter()
        for step in range(cfg.steps):
            trainer.update(step, next(batches))
    return trainer.ae.eval(), time.perf_counter() - started


class DictionaryLearningSAE(SparseAutoencoder):
    """dictionary_learning's AutoEncoderTopK behind our interface, for our eval. Its inference encode (what
    its users call) keeps the top k of each row, as its training did."""

    arch = "external"

    def __init__(self, ae):
        nn.Module.__init__(self)
        self.ae, self.d_in, self.d_sae = ae, int(ae.activation_dim), int(ae.dict_size)

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 - the name every SAE library uses
        return self.ae.decoder.weight.T

    def encode(self, x: torch.Tensor) -> DenseCode:
        return DenseCode(self.ae.encode(x))

    def decode(self, code) -> torch.Tensor:
        return self.ae.decode(code.dense(self.d_sae))

    def config(self) -> dict:
        return {"arch": self.arch, "d_in": self.d_in, "d_sae": self.d_sae, "architecture": "dictionary_learning topk"}


def _inference_model(training_sae, folder: Path, device):
    """What a SAELens user loads: the training SAE saved as its inference model and loaded back
    (BatchTopK becomes a JumpReLU with the learned threshold, instead of a batch-dependent top k)."""
    from sae_lens import SAE

    training_sae.save_inference_model(folder)
    return SAE.load_from_disk(str(folder), device=str(device)).eval()


def _pick(metrics: dict) -> dict:
    return {key: metrics.get(key, float("nan")) for key in METRICS}


def _installed_saelens_version() -> str:
    return version("sae-lens")


def format_quality_table(rows: list[dict]) -> str:
    lines = [
        "| arch | implementation | " + " | ".join(TABLE_COLUMNS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in TABLE_COLUMNS) + " |",
    ]
    for r in rows:
        cells = [_cell(r.get(c, math.nan), c) for c in TABLE_COLUMNS]
        lines.append(f"| {r['arch']} | {r['impl']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float, column: str) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.0f}" if column == "tokens_per_s" else f"{value:.4g}"


def plot_l0_curves(rows: list[dict], k: int, path: Path) -> None:
    """Each architecture's training L0 against tokens, ours and SAELens's, beside the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows if r.get("l0_curve")))
    if not archs:
        return
    fig, axes = plt.subplots(1, len(archs), figsize=(4 * len(archs), 3.4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for row in rows:
            if row["arch"] == arch and row.get("l0_curve"):
                tokens, l0 = zip(*row["l0_curve"])
                ax.plot(tokens, l0, label=row["impl"], linestyle="-" if row["impl"] == "saepipe" else "--")
        ax.axhspan(0.9 * k, 1.1 * k, color="grey", alpha=0.2, label=f"target {k} ± 10%")
        ax.set(title=arch, xlabel="training tokens", ylabel="L0", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_rows(out: Path) -> list[dict]:
    return json.loads((out / "quality.json").read_text())["rows"]
