"""The report's figures as PNG bytes. Figures are built with matplotlib's object API on the Agg canvas
(no pyplot, so no global state and no display is ever touched)."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from stages.report.runs import EvaluatedRun

DENSITY_BINS = np.linspace(-8.0, 0.0, 41)  # log10 firing fraction, as eval's histogram
TRAINING_KEYS = (
    ("loss", "loss"),
    ("fve", "fraction of variance explained"),
    ("l0", "L0"),
    ("dead_fraction", "dead fraction"),
)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    # no "Software" text chunk: the bytes then hold no URL and do not change with the matplotlib version
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def run_color(index: int) -> str:
    return f"C{index % 10}"


def training_curves(runs: list[EvaluatedRun]) -> bytes | None:
    """Loss, fve, L0 and dead fraction against training tokens, one line per run."""
    logged = [(i, run) for i, run in enumerate(runs) if run.log]
    if not logged:
        return None
    fig = _figure(10, 6.5)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (key, title) in zip(axes, TRAINING_KEYS):
        for i, run in logged:
            points = [(row["tokens"], row[key]) for row in run.log if key in row and row[key] is not None]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, color=run_color(i), label=run.label, linewidth=1.4)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "loss" and all(row.get("loss", 1) > 0 for _, run in logged for row in run.log):
            ax.set_yscale("log")
    for ax in axes[2:]:
        ax.set_xlabel("training tokens")
    axes[0].legend(fontsize=8)
    return to_png(fig)


def density_counts(run: EvaluatedRun, density: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(bin edges, counts, dead latents) of log10 firing fractions: eval's histogram when eval.json has
    one, else binned from the per-latent fractions."""
    saved = run.eval.get("log10_density_histogram")
    if saved:
        return np.asarray(saved["edges"], float), np.asarray(saved["counts"], float), int(saved.get("dead", 0))
    if density is None:
        return None
    alive = density[density > 0]
    counts, _ = np.histogram(np.clip(np.log10(alive), DENSITY_BINS[0], DENSITY_BINS[-1]), bins=DENSITY_BINS)
    return DENSITY_BINS, counts.astype(float), int((density == 0).sum())


def density_histogram(run: EvaluatedRun, density: np.ndarray | None, color: str, note: str = "") -> bytes | None:
    """Latents by log10 of the fraction of eval tokens they fire on; dead latents as a separate grey bar
    left of the axis's range (they have no logarithm)."""
    data = density_counts(run, density)
    if data is None:
        return None
    edges, counts, dead = data
    width = float(edges[1] - edges[0])
    fig = _figure(6, 3.2)
    ax = fig.subplots()
    ax.bar(edges[:-1], counts, width=width, align="edge", color=color, label="alive latents")
    dead_x = float(edges[0]) - 2 * width
    total = int(counts.sum()) + dead
    ax.bar(
        [dead_x],
        [dead],
        width=width * 1.5,
        color="0.55",
        label=f"dead: {dead:,} of {total:,} ({dead / max(total, 1):.1%})",
    )
    ax.axvline(math.log10(0.1), color="0.3", linestyle=":", linewidth=1, label="dense (10%)")
    ax.set_xlabel("log10 firing fraction on eval tokens")
    ax.set_ylabel("latents")
    ax.set_title(f"{run.label}: feature density{note}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    return to_png(fig)


def frontier(runs: list[EvaluatedRun], y_key: str, y_label: str) -> bytes | None:
    """One point per run at (l0, y_key), numbered, with the run names in a legend below (run names are
    too long to write beside the points); None when no run has both values."""
    points = [(i, run) for i, run in enumerate(runs) if _finite(run.eval.get("l0")) and _finite(_value(run, y_key))]
    if not points:
        return None
    fig = _figure(5.5, 4.2 + 0.2 * len(points))
    ax = fig.subplots()
    for i, run in points:
        x, y = run.eval["l0"], _value(run, y_key)
        ax.scatter([x], [y], color=run_color(i), s=40, zorder=3, label=f"{i + 1}: {run.label}")
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    l0s = [run.eval["l0"] for _, run in points]
    if min(l0s) > 0 and max(l0s) / min(l0s) > 4:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(y_label)
    ax.set_title(f"L0 vs {y_label}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    fig.legend(loc="outside lower center", fontsize=7, frameon=False)
    return to_png(fig)


def per_hook(runs: list[EvaluatedRun]) -> bytes | None:
    """For runs that write several hooks (crosscoders, CLTs): fve of each written hook and, for a CLT, L0
    and dead fraction per layer; None when no run has them."""
    shown = [(i, run) for i, run in enumerate(runs) if run.eval.get("per_hook")]
    if not shown:
        return None
    layered = [(i, run) for i, run in shown if run.eval.get("per_layer")]
    panels = [("fve", "fve of each written hook")]
    panels += [("l0", "L0 per layer"), ("dead_fraction", "dead fraction per layer")] if layered else []
    fig = _figure(4.2 * len(panels), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (key, title) in zip(axes, panels):
        for i, run in shown if key == "fve" else layered:
            if key == "fve":
                hooks = list(run.eval["per_hook"])
                x, values = hooks, [run.eval["per_hook"][h]["fve"] for h in hooks]
            else:
                x, values = run.eval["per_layer"]["layer"], run.eval["per_layer"][key]
            ax.plot(x, values, marker="o", color=run_color(i), label=run.label, linewidth=1.4)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "fve":
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        else:
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    return to_png(fig)


def _value(run: EvaluatedRun, key: str):
    """An eval.json value by its dotted key ("probing.sae_top_1_accuracy"), or None."""
    value = run.eval
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def activation_histogram(values: np.ndarray, title: str, color: str) -> bytes:
    """Non-zero activations of one latent over the scanned eval rows."""
    fig = _figure(3.6, 2.2)
    ax = fig.subplots()
    if len(values):
        ax.hist(values, bins=40, color=color)
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "never fired", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("activation", fontsize=8)
    ax.tick_params(labelsize=7)
    return to_png(fig, dpi=80)
