"""`saepipe report`: gather every run's data, draw the figures, write index.html and the PNG files."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.basics import run_dir, tracking
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.basics.settings import device_setting, setting
from stages.evaluate import check_compatible, open_evaluated
from stages.evaluate.evaluated import require_store_there
from stages.host_model.loading import load_host_model
from stages.report import plots
from stages.report.html import Image, Page, render
from stages.report.latents import BrowseOptions, browse, check_latents
from stages.report.runs import EvaluatedRun, load_runs
from store_schema.reader import open_store

INDEX = "index.html"
LATENT_PLOTS = "latents"  # subfolder for the per-latent histograms


@dataclass
class ReportOptions:
    runs: list[str]  # evaluated run folders
    out: Path = setting(Path("report"), "folder for index.html and the PNG files")
    browse: BrowseOptions = field(default_factory=BrowseOptions)
    use_model: bool = setting(
        True,
        "do not load the model: tokens shown as ids, no promoted/suppressed output tokens",
        flag="--no-model",
        inverted=True,
    )
    device: str = device_setting()


def check_named_latents(runs: list[EvaluatedRun], named: tuple[int, ...]) -> None:
    """Out-of-range latents fail before any run is scanned (eval.json records each SAE's width)."""
    for run in runs:
        d_sae = run.sae_config.get("d_sae")
        if d_sae is not None:
            check_latents(named, int(d_sae), run.label)


class ModelCache:
    """Host models by name, each loaded once (several runs usually share one model)."""

    def __init__(self, device):
        self.device, self.models = device, {}

    def __call__(self, name: str):
        if name not in self.models:
            self.models[name] = load_host_model(name, str(self.device))
        return self.models[name]


def build_report(opts: ReportOptions) -> Path:
    runs = load_runs(opts.runs)
    check_named_latents(runs, opts.browse.named)
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise SaepipeError(f"--out {out} is a file: pass a folder for index.html and the PNG files")
    run_dir.refuse_inside_store(out)
    device = resolve_device(opts.device)
    model_for = ModelCache(device) if opts.use_model else None

    images: list[Image] = []

    def keep(filename: str, png: bytes | None, alt: str) -> Image | None:
        if png is None:
            return None
        images.append(Image(filename, png, alt))
        return images[-1]

    browsers, densities = [], []
    for i, run in enumerate(runs):
        evaluated = open_evaluated(run.path, device)
        evaluated.label = run.label
        store_path = evaluated.store_path
        if run.eval.get("store") and run.eval.get("store_fingerprint"):
            # the store eval measured (its --store, if it was given one), which the report's figures are of
            store_path, evaluated.store_fingerprint = run.eval["store"], run.eval["store_fingerprint"]
        require_store_there(store_path, run.path)
        store = open_store(store_path)
        check_compatible(evaluated, store)
        browser, density = browse(evaluated, store, run.density, opts.browse, model_for, device)
        histograms = {}
        for latent in browser.latents:
            png = plots.activation_histogram(latent.values, f"latent {latent.latent}", plots.run_color(i))
            histograms[latent.latent] = keep(
                f"{LATENT_PLOTS}/{run.slug}_latent_{latent.latent}.png",
                png,
                f"{run.label} latent {latent.latent} activations",
            )
        browsers.append((run, browser, histograms))
        note = "" if run.density is not None or run.eval.get("log10_density_histogram") else " (scanned rows)"
        png = plots.density_histogram(run, density, plots.run_color(i), note)
        densities.append(keep(f"density_{run.slug}.png", png, f"{run.label} feature density"))

    notes: dict[str, list[str]] = {}
    training = keep("training_curves.png", plots.training_curves(runs), "training curves")
    if training is None:
        notes["training"] = ["no run has a training log (train_log.jsonl)"]
    frontiers = [
        keep("frontier_l0_fve.png", plots.frontier(runs, "fve", "fve"), "L0 vs fve"),
        keep(
            "frontier_l0_ce_recovered.png",
            plots.frontier(runs, "ce_recovered", "CE loss recovered"),
            "L0 vs CE loss recovered",
        ),
    ]
    for key, label in (("probing.sae_top_1_accuracy", "k-sparse probing accuracy, k = 1"),
                       ("absorption.mean_absorption_fraction_score", "absorption fraction"),
                       ("ground_truth.mcc", "ground-truth MCC")):  # fmt: skip
        extra = keep(f"frontier_l0_{key.replace('.', '_')}.png", plots.frontier(runs, key, label), f"L0 vs {label}")
        if extra is not None:  # evaluated with --suite probing, absorption or ground-truth
            frontiers.append(extra)
    layers = keep("per_hook.png", plots.per_hook(runs), "per written hook and per layer")
    if layers is not None:  # crosscoders and CLTs: shown with the frontier
        frontiers.append(layers)
    if frontiers[1] is None:
        notes["frontier"] = ["no run has ce_recovered: evaluate with the model (`saepipe eval RUN` without --no-model)"]
    if len(runs) == 1:
        notes.setdefault("frontier", []).append("one run: pass several run folders to compare them")

    page = Page(
        runs,
        time.strftime("%Y-%m-%d %H:%M"),
        training,
        [d for d in densities if d],
        [f for f in frontiers if f],
        browsers,
        notes,
    )
    (out / LATENT_PLOTS).mkdir(parents=True, exist_ok=True)  # only now: a refused report writes nothing
    for image in images:
        _write_atomic(out / image.filename, image.png)
    _write_atomic(out / INDEX, render(page).encode("utf-8"))
    _log_to_wandb(runs, out, [training, *frontiers], densities)
    return out / INDEX


def _log_to_wandb(runs: list[EvaluatedRun], out: Path, shared: list[Image | None], densities: list) -> None:
    """The plots, into the wandb run of each run trained with --wandb: those of every run, and its own
    feature density (the latent browser's histograms stay in the page)."""
    for run, density in zip(runs, densities):
        images = {f"report/{Path(i.filename).stem}": out / i.filename for i in shared if i is not None}
        if density is not None:
            images["report/density"] = out / density.filename
        tracking.log_images(run.path, images)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def report_summary(index: Path, started: float) -> str:
    return f"report written: {index} ({time.perf_counter() - started:.1f} s); open it in a browser"
