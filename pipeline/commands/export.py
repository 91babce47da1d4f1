"""`saepipe export`: trained runs in another tool's format. circuit-tracer: a set of per-layer transcoders
(one run per layer of the model) or one cross-layer transcoder over every layer (docs/circuit-tracer.md).
(Every SAE and transcoder run already holds its SAELens export, in RUN/saelens.)"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from stages.basics.errors import SaepipeError
from stages.evaluate.evaluated import recorded_hooks
from stages.saes.io import HookIO
from stages.saes.saved import load_sae
from stages.train.circuit_tracer_export import export_clt, export_transcoder_set
from store_schema.normalization import Normalization

FORMATS = ("circuit-tracer",)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="circuit-tracer", help="the format to write")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder to write")
@click.option("--overwrite", is_flag=True, help="replace the folder")
def export(runs: tuple[Path, ...], fmt: str, out: Path, overwrite: bool) -> None:
    """Write trained runs in another tool's format: for circuit-tracer, one transcoder run per layer of the
    model (relu, jumprelu or batchtopk activations), or one CLT over every layer."""
    written = export_circuit_tracer(list(runs), out, overwrite)
    click.echo(f"circuit-tracer folder ready: {written} (load it with ReplacementModel.from_pretrained)")


def export_circuit_tracer(runs: list[Path], out: Path, overwrite: bool = False) -> Path:
    """Check every run, write the folder beside `out` and move it into place: a refused or interrupted
    export leaves nothing behind, and an existing folder is replaced only with `overwrite`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SaepipeError(f"--out {out} exists and is not empty: pass --overwrite to replace it")
    loaded = [(run, *load_sae(run)) for run in runs]
    models = {cfg["store"]["model"]["name"] for _, _, cfg in loaded}
    if len(models) > 1:
        raise SaepipeError(f"the runs are of different models ({', '.join(sorted(models))}): export one model's")
    model = loaded[0][2]["store"]["model"]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if any(sae.circuit_tracer_format == "clt" for _, sae, _ in loaded):
            _clt(loaded, staging, model)
        else:
            _transcoder_set(loaded, staging, model)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _clt(loaded, staging: Path, model: dict) -> None:
    if len(loaded) != 1:
        raise SaepipeError("a cross-layer transcoder exports alone: pass its one run folder")
    run, clt, cfg = loaded[0]
    first, last = cfg["layers"]
    if (first, last) != (0, model["n_layers"] - 1):
        raise SaepipeError(
            f"{run} covers layers {first}-{last}, but circuit-tracer's CLT spans every layer of {model['name']} "
            f"(0-{model['n_layers'] - 1}): train with --layers 0-{model['n_layers'] - 1}"
        )
    io, norms = recorded_hooks(clt, cfg, run)
    export_clt(clt, norms, io.reads, io.writes, staging, model["name"])


def _transcoder_set(loaded, staging: Path, model: dict) -> None:
    layers = {}
    for run, sae, cfg in loaded:
        layer, io, norms = _mlp_layer(run, sae, cfg)
        if layer in layers:
            raise SaepipeError(f"two runs transcode layer {layer} ({layers[layer][3]} and {run}): pass one per layer")
        layers[layer] = (sae, norms[io.reads[0]], norms[io.writes[0]], run)
    export_transcoder_set({k: v[:3] for k, v in layers.items()}, staging, model["n_layers"], model["name"])


def _mlp_layer(run: Path, sae, cfg: dict) -> tuple[int, HookIO, dict[str, Normalization]]:
    """The layer whose MLP the transcoder run replaces (blocks.L.mlp.hook_in -> blocks.L.hook_mlp_out), with
    the hooks it reads and writes and their normalizations."""
    if sae.circuit_tracer_format != "transcoder":
        raise SaepipeError(f"{run} is a {sae.arch} run: circuit-tracer reads transcoders (or one clt)")
    io, norms = recorded_hooks(sae, cfg, run)
    (in_hook,), (out_hook,) = io.reads, io.writes
    prefix = in_hook.removesuffix(".mlp.hook_in")
    if prefix == in_hook or out_hook != f"{prefix}.hook_mlp_out" or not prefix.startswith("blocks."):
        raise SaepipeError(
            f"{run} maps {in_hook} to {out_hook}: circuit-tracer's transcoders map a layer's MLP input to its "
            f"output (blocks.L.mlp.hook_in -> blocks.L.hook_mlp_out)"
        )
    return int(prefix.removeprefix("blocks.")), io, norms
