"""The `saepipe` command line. Heavy imports (torch, zarr, transformer_lens) happen inside commands."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

from pipeline.commands.report import compare, report  # click and nothing heavy at import
from stages import __version__
from stages.basics.defaults import DEFAULT_DATASET, DEFAULT_HOOK, DEFAULT_MODEL
from stages.basics.errors import SaepipeError
from stages.collect.config import CollectConfig
from stages.train.config import TrainConfig

EXIT_USER_ERROR = 2


class _Group(click.Group):
    """Turns the project's user-facing errors into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        from store_schema.schema import StoreError

        try:
            return super().invoke(ctx)
        except (SaepipeError, StoreError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Every writer commits atomically, so what was committed before the disk filled is intact.
            where = f" writing {e.filename}" if e.filename else ""
            click.echo(
                f"error: no space left on device{where}: free space, then re-run the same command "
                f"(collect resumes where it stopped; train resumes with --resume)",
                err=True,
            )
            sys.exit(EXIT_USER_ERROR)


def _device_option(f):
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="saepipe")
def main() -> None:
    """Collect a model's activations once into a Zarr store, then train and evaluate SAEs from it."""


@main.command()
@click.option("--model", default=DEFAULT_MODEL, help="smollm2-135m (offline), an HF id, or a local HF model folder")
@click.option(
    "--dataset",
    default=DEFAULT_DATASET,
    help="python-docs (offline), an HF dataset name, or local .txt/.jsonl/.parquet files (comma list or glob)",
)
@click.option("--split", "dataset_split", default="train", help="dataset split (HF datasets)")
@click.option("--text-column", default="text")
@click.option("--hook", "hooks", multiple=True, default=[DEFAULT_HOOK], help="hook point; repeat for several")
@click.option("--tokens", type=int, default=100_000, help="training rows (tokens) to collect; eval rows come on top")
@click.option("--context-size", type=int, default=128)
@click.option("--out", type=click.Path(), help="the store folder to write (STORE.zarr)")
@click.option("--normalize", type=click.Choice(["center-scale", "token", "none"]), default="center-scale")
@click.option("--eval-fraction", type=float, default=0.05, help="share of contexts held out for eval")
@click.option("--batch-size", type=int, default=16, help="contexts per forward pass")
@_device_option
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", help="the host model's dtype"
)
@click.option("--seed", type=int, default=0)
@click.option("--drop-first", type=int, default=1, help="positions [0, N) are not stored (0 is an attention sink)")
@click.option(
    "--keep-special",
    is_flag=True,
    help="also store rows at BOS/separator tokens inside contexts (attention sinks; left out by default)",
)
@click.option(
    "--outlier-factor",
    type=float,
    default=10.0,
    help="leave out rows whose norm exceeds this many times the median (massive activations); 0 keeps all",
)
@click.option("--shuffle-buffer-rows", type=int, default=65_536, help="rows shuffled together before writing")
@click.option("--chunk-rows", type=int, default=8_192, help="rows per Zarr chunk")
@click.option("--warmup-rows", type=int, default=65_536, help="rows the normalization is estimated from")
@click.option(
    "--nonfinite",
    type=click.Choice(["skip", "abort"]),
    default="skip",
    help="contexts with NaN/inf activations: leave them out (counted) or stop",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="run the model on a local dask cluster of N worker processes (e.g. one per GPU)",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="run the model on the workers of a running dask cluster (tcp://HOST:PORT); --out must be "
    "on a filesystem they all see",
)
@click.option(
    "--append",
    "append_to",
    type=click.Path(),
    default=None,
    metavar="STORE",
    help="grow the complete STORE to --tokens training tokens, with its own settings (instead of --out)",
)
@click.option("--resume", is_flag=True, help="continue an interrupted collect (also done by re-running it)")
@click.option("--overwrite", is_flag=True, help="replace whatever --out holds")
@click.option("--no-progress", is_flag=True)
@click.pass_context
def collect(
    ctx: click.Context, no_progress: bool, keep_special: bool, outlier_factor: float, append_to: str | None, **kwargs
) -> None:
    """Run the model once over the text and write normalized fp16 activations to a Zarr store."""
    from stages.collect import run_collect

    if append_to is not None:
        kwargs["out"] = _append_target(ctx, append_to, kwargs["out"])
    elif kwargs["out"] is None:
        out = next(param for param in ctx.command.params if param.name == "out")
        raise click.MissingParameter(ctx=ctx, param=out, message="Or grow a complete store with --append STORE.")
    cfg = CollectConfig(
        **kwargs,
        exclude_special=not keep_special,
        outlier_factor=outlier_factor or None,
        progress=not no_progress,
        append=append_to is not None,
    )
    cfg.hooks = tuple(cfg.hooks)
    out = run_collect(cfg)
    click.echo(f"store ready: {out}")


# What decides a store's contents: an append takes all of it from the store.
_STORE_SETTINGS = (
    "model",
    "dataset",
    "dataset_split",
    "text_column",
    "hooks",
    "context_size",
    "normalize",
    "eval_fraction",
    "batch_size",
    "dtype",
    "seed",
    "drop_first",
    "keep_special",
    "outlier_factor",
    "shuffle_buffer_rows",
    "chunk_rows",
    "warmup_rows",
    "nonfinite",
)


def _append_target(ctx: click.Context, store: str, out: str | None) -> str:
    """The store `collect --append` grows, after refusing what an append cannot take."""
    from click.core import ParameterSource

    flags = {param.name: param.opts[0] for param in ctx.command.params}
    given = [flags[name] for name in _STORE_SETTINGS if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given:
        raise SaepipeError(f"--append grows the store with the settings it was collected with: drop {', '.join(given)}")
    if out is not None:
        raise SaepipeError("--append STORE names the store it grows: drop --out")
    if ctx.get_parameter_source("tokens") is ParameterSource.DEFAULT:
        raise SaepipeError("--append needs --tokens N: the training tokens the store should hold in all")
    return store


@main.command()
@click.argument("store")
@click.option("--hook", default=None, help="the store's hook to train on (default: its only hook)")
@click.option("--arch", default="topk", help="SAE architecture")
@click.option("--width", type=int, default=4096, help="number of latents (d_sae)")
@click.option(
    "--k", type=int, default=None, help="active latents per token: topk, batchtopk, matryoshka, mp [default: 32]"
)
@click.option("--tokens", type=int, default=1_000_000, help="training tokens (epochs repeat when above the store)")
@click.option("--batch-size", type=int, default=4096)
@click.option("--out", required=True, type=click.Path(), help="run folder to write")
@click.option("--lr", type=float, default=None, help="default: 2e-4 / sqrt(width / 2^14) (TopK paper)")
@click.option(
    "--max-grad-norm",
    type=float,
    default=1.0,
    help="clip the gradient norm (in summed-squared-error units, as SAELens); 0: no clipping",
)
@click.option("--aux-k", type=int, default=None, help="AuxK latents (default d_in / 2)")
@click.option("--aux-coef", type=float, default=1 / 32)
@click.option(
    "--dead-window",
    "dead_window_tokens",
    type=int,
    default=None,
    help="tokens without firing before a latent counts as dead (default min(10M, tokens/4))",
)
@click.option(
    "--l1-coef", type=float, default=None, help="relu: L1 coefficient (sparsity penalty weighted by decoder norms)"
)
@click.option("--l1-warmup-frac", type=float, default=0.05, help="relu: share of training over which L1 ramps up")
@click.option("--ghost-grads", is_flag=True, help="relu: ghost gradients for dead latents (after the dead window)")
@click.option(
    "--bandwidth",
    type=float,
    default=None,
    help="jumprelu: straight-through estimator bandwidth [default: 0.001·√d_in]",
)
@click.option("--init-threshold", type=float, default=None, help="jumprelu: initial threshold [default: d_in/width]")
@click.option("--l0-coef", type=float, default=None, help="jumprelu: L0 penalty coefficient")
@click.option("--target-l0", type=float, default=None, help="jumprelu: penalize L0 away from this target instead")
@click.option("--groups", default=None, help="matryoshka: increasing prefix sizes, e.g. 512,2048,4096 (last = width)")
@click.option("--residual-threshold", type=float, default=None, help="mp (dynamic): stop when ‖residual‖ falls below")
@click.option("--max-iterations", type=int, default=None, help="mp (dynamic): at most this many selections per row")
@_device_option
@click.option("--seed", type=int, default=0)
@click.option("--log-every", type=int, default=20, help="steps between training-log lines")
@click.option("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
@click.option(
    "--sweep",
    "sweep_specs",
    multiple=True,
    metavar="NAME=V1,V2",
    help="train every combination from one pass over the store; --out becomes the sweep folder",
)
@click.option("--resume", is_flag=True, help="continue from the run folder's checkpoint")
@click.option("--overwrite", is_flag=True, help="replace the run folder")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    help="data-parallel processes on this machine (one per GPU; gloo on CPU); see also torchrun",
)
@click.option("--no-progress", is_flag=True)
def train(
    store: str,
    hook: str | None,
    no_progress: bool,
    groups: str | None,
    sweep_specs: tuple[str, ...],
    nproc: int,
    **kwargs,
) -> None:
    """Train an SAE on a store's training rows (the model is never loaded)."""
    from stages.train import run_sweep, sweeps
    from store_schema.reader import open_store

    if groups is not None:
        try:
            kwargs["groups"] = tuple(int(g) for g in groups.split(","))
        except ValueError:
            raise SaepipeError(
                f"--groups must be comma-separated integers like 512,2048,4096, got {groups!r}"
            ) from None

    hook = hook or _only_hook(open_store(store))
    cfg = TrainConfig(store=store, hook=hook, progress=not no_progress, **kwargs)
    axes = sweeps.parse_axes(list(sweep_specs))
    outs = run_sweep(sweeps.expand(cfg, axes) if axes else [cfg], nproc)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun: rank 0 alone reports
        return
    if not axes:
        click.echo(f"run ready: {outs[0]}")
        return
    summary = sweeps.write_summary(Path(cfg.out), axes, outs)
    click.echo(sweeps.format_summary(summary))
    click.echo(f"sweep ready: {cfg.out} ({len(outs)} runs, summary in sweep.json)")


@main.command(name="eval")
@click.argument("run", type=click.Path())
@click.option("--store", default=None, help="default: the store the SAE was trained on")
@click.option("--model", default=None, help="default: the store's model")
@click.option("--tokens", type=int, default=None, help="at most this many held-out tokens (default: all)")
@click.option("--no-model", is_flag=True, help="store-only metrics; do not load the model")
@click.option("--splice-from", type=int, default=0, help="splice the SAE in only at positions >= this one")
@click.option(
    "--ablation-contexts",
    type=int,
    default=4,
    help="held-out contexts for ablation sparsity (0: skip it; about 6 s each for SmolLM2 at k 32 on a 2-core CPU)",
)
@click.option(
    "--external",
    default=None,
    type=click.Path(),
    help="a SAELens SAE folder trained elsewhere: evaluate it on --store, writing into RUN",
)
@_device_option
@click.option("--no-progress", is_flag=True)
def eval_(
    run: str,
    store: str | None,
    model: str | None,
    tokens: int | None,
    no_model: bool,
    splice_from: int,
    ablation_contexts: int,
    external: str | None,
    device: str,
    no_progress: bool,
) -> None:
    """Evaluate a trained SAE (RUN: its run folder) on held-out rows; with the model, CE loss, KL and
    ablation sparsity with it spliced in. Definitions: docs/metrics.md."""
    from stages.evaluate import format_table, run_eval

    result = run_eval(
        run,
        store,
        model,
        tokens,
        use_model=not no_model,
        device=device,
        progress=not no_progress,
        splice_from=splice_from,
        ablation_contexts=ablation_contexts,
        external=external,
    )
    click.echo(format_table(result))
    click.echo(f"written: {Path(run) / 'eval.json'}")


main.add_command(report)
main.add_command(compare)


@main.command()
@click.argument("store")
@click.option("--hook", default=None, help="default: the store's only hook")
@click.option("--archs", default="topk,batchtopk,jumprelu,mp", help="architectures to compare")
@click.option("--width", type=int, default=4096)
@click.option("--k", type=int, default=32, help="the L0 both implementations are trained to")
@click.option("--tokens", type=int, default=1_000_000, help="training tokens for each SAE")
@click.option("--batch-size", type=int, default=4096)
@click.option("--lr", type=float, default=None, help="learning rate for both (default: the TopK paper's for the width)")
@click.option("--eval-tokens", type=int, default=4096, help="held-out tokens for every metric")
@click.option("--no-model", is_flag=True, help="store-only metrics (no CE/KL)")
@click.option("--out", required=True, type=click.Path(), help="folder for the runs, quality.json and quality.md")
@_device_option
@click.option("--seed", type=int, default=0)
@click.option("--no-progress", is_flag=True)
def quality(
    store: str, hook: str | None, archs: str, k: int, eval_tokens: int, no_model: bool, no_progress: bool, **kwargs
) -> None:
    """Train ours and SAELens's SAEs on the same rows and compare them (needs sae-lens)."""
    from pipeline.tools import quality as quality_stage
    from store_schema.reader import open_store

    hook = hook or _only_hook(open_store(store))
    base = TrainConfig(store=store, hook=hook, progress=not no_progress, **kwargs)
    rows = quality_stage.compare(base, [a.strip() for a in archs.split(",")], k, eval_tokens, use_model=not no_model)
    click.echo(quality_stage.format_table(rows))


@main.command()
@click.option(
    "--out",
    type=click.Path(),
    default="runs/bench",
    show_default=True,
    help="folder for bench.json and the benchmarks' scratch stores",
)
@_device_option
@click.option("--only", default="", help="comma-separated keys to measure (default: all)")
@click.option("--d-in", type=int, default=576, show_default=True)
@click.option("--width", type=int, default=4096, show_default=True)
@click.option("--k", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=4096, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True, help="rounds per side, alternating the sides")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="host model of the collect benchmark")
@click.option("--hook", "collect_hook", default=DEFAULT_HOOK, show_default=True, help="hook of the collect benchmark")
@click.option("--no-progress", is_flag=True)
def bench(out: str, only: str, no_progress: bool, **kwargs) -> None:
    """Measure speed as same-run ratios (reader, training, matching pursuit, collect, memory); writes
    OUT/bench.json. Needs sae-lens for the SAELens comparisons."""
    from pipeline.tools import bench as bench_stage

    keys = tuple(k.strip() for k in only.split(",") if k.strip())
    unknown = sorted(set(keys) - set(bench_stage.KEYS))
    if unknown:
        raise SaepipeError(f"--only: unknown benchmark {', '.join(unknown)}; known: {', '.join(bench_stage.KEYS)}")
    if kwargs["rounds"] < 1:
        raise SaepipeError(f"--rounds must be at least 1, got {kwargs['rounds']}")
    result = bench_stage.run_bench(
        bench_stage.BenchConfig(out=Path(out), only=keys, progress=not no_progress, **kwargs)
    )
    click.echo(bench_stage.format_table(result))
    click.echo(f"written: {Path(out) / 'bench.json'}")


@main.command()
@click.option("--out", default="runs/soak", type=click.Path(), help="work folder (a fresh store, two runs, soak.json)")
@click.option("--seconds", type=float, default=60.0, help="how long the store is under load")
@click.option("--model", default="tiny-random", help="the model the store is collected (and appended) from")
@click.option("--readers", type=int, default=2, help="reader processes")
def soak(out: str, seconds: float, model: str, readers: int) -> None:
    """Train from a store while other processes read it and one appends to it; report throughput and
    whether every reader saw consistent data (a benchmark; writes OUT/soak.json)."""
    from pipeline.tools.soak import SoakConfig, run_soak

    report = run_soak(SoakConfig(out=out, seconds=seconds, model=model, readers=readers))
    click.echo(json.dumps(report, indent=2))
    if not report["consistent"]:
        raise SaepipeError(f"the soak found inconsistent data or a damaged store: see {Path(out) / 'soak.json'}")


def _only_hook(store) -> str:
    if len(store.hooks) > 1:
        raise SaepipeError(f"the store holds several hooks ({', '.join(store.hooks)}): pick one with --hook")
    return store.hooks[0]


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the raw metadata as JSON")
def info(path: str, as_json: bool) -> None:
    """Describe a store or a run folder."""
    from pipeline.tools.describe import describe

    summary = describe(path)
    click.echo(json.dumps(summary, indent=2) if as_json else summary_text(summary))


def summary_text(summary: dict, indent: str = "") -> str:
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(summary_text(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


@main.group(cls=_Group)
def store() -> None:
    """Look after a store: describe it, copy it, verify its checksums."""


@store.command(name="info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the raw metadata as JSON")
@click.pass_context
def store_info(ctx: click.Context, path: str, as_json: bool) -> None:
    """Describe a store (the same as `saepipe info`)."""
    ctx.invoke(info, path=path, as_json=as_json)


@store.command(name="copy")
@click.argument("src")
@click.argument("dst")
@click.option("--threads", type=int, default=8, help="files copied at once")
@click.option("--no-progress", is_flag=True)
def store_copy(src: str, dst: str, threads: int, no_progress: bool) -> None:
    """Copy a complete store to or from object storage (any fsspec URL or path); run it again to resume."""
    from store_schema.copy import copy_store

    done = copy_store(src, dst, threads=threads, progress=not no_progress)
    click.echo(
        f"copied {done['files_copied']:,} files ({done['bytes_copied'] / 1e6:,.1f} MB), "
        f"{done['files_skipped']:,} already there: {dst}"
    )


@store.command(name="verify")
@click.argument("path", type=click.Path())
@click.option("--no-progress", is_flag=True)
def store_verify(path: str, no_progress: bool) -> None:
    """Check every chunk against the CRC32C written with it; name every damaged or missing chunk."""
    from store_schema.reader import open_store
    from store_schema.verify import verify_store

    result = verify_store(open_store(path), progress=not no_progress)
    for name in result.unverifiable:
        click.echo(f"warning: {name} has no checksums (written before saepipe recorded them): not verified", err=True)
    for line in result.damaged:
        click.echo(line)
    if result.damaged:
        raise SaepipeError(
            f"{len(result.damaged)} damaged chunk(s) in {path} (listed above): the store cannot be "
            f"trusted; collect it again, or copy it again from a good replica"
        )
    click.echo(f"ok: {result.checked:,} chunks match their checksums")


@main.command(name="prepare-model")
@click.argument("name", default=DEFAULT_MODEL)
def prepare_model(name: str) -> None:
    """Convert the offline default model once into the user cache (done by `make setup`)."""
    from stages.host_model.smollm2 import prepare_default_model

    if name != DEFAULT_MODEL:
        raise SaepipeError(f"only the offline default {DEFAULT_MODEL} needs preparing; other models load directly")
    click.echo(f"model ready: {prepare_default_model()}")


if __name__ == "__main__":
    main()
