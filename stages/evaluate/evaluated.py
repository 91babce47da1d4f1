"""Which SAE is measured, on which store, and the normalization that maps raw activations into its input
space: a run folder of ours, or a SAELens SAE trained elsewhere."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.basics import run_dir
from stages.basics.errors import SaepipeError
from stages.saes import SparseAutoencoder
from stages.saes.external import ExternalSAE
from stages.saes.saved import load_sae
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore, open_store

# sae_lens is optional (the test extra): imported only to evaluate an SAE trained with it.


def run_normalization(cfg: dict, key: str = "normalization") -> Normalization:
    """The normalization a run recorded: of its hook (a transcoder's input hook), or with
    key="out_normalization" of a transcoder's output hook."""
    saved = cfg[key]
    mean = None if saved.get("mean") is None else np.asarray(saved["mean"], np.float32)
    return Normalization(saved["mode"], mean, float(saved["scale"]), saved.get("max_norm"))


def run_hooks(cfg: dict) -> tuple[str, Normalization, str | None, Normalization | None]:
    """(the hook a run writes, its normalization, the hook it reads when that is another one, its
    normalization): an SAE reads and writes its hook; a transcoder reads in_hook and writes out_hook."""
    multi = multi_hooks(cfg)
    if multi is not None:  # a crosscoder or CLT: its first written hook (multi_hooks has them all)
        return multi[1][0], multi[2][multi[1][0]], None, None
    if cfg.get("in_hook") is None:
        return cfg["hook"], run_normalization(cfg), None, None
    return cfg["out_hook"], run_normalization(cfg, "out_normalization"), cfg["in_hook"], run_normalization(cfg)


def check_hook_and_width(which: str, hook: str, d_in: int, store: ActivationStore) -> None:
    """`which` SAE (e.g. "the SAE") reads `hook` with width `d_in`: the store must hold them."""
    if hook not in store.hooks:
        raise SaepipeError(
            f"{which} reads hook '{hook}' but store {store.location} holds "
            f"{', '.join(store.hooks)}: pass --store with a store of that hook"
        )
    if d_in != store.width(hook):
        raise SaepipeError(
            f"{which} has d_in {d_in} but store {store.location} has rows of width {store.width(hook)} "
            f"at '{hook}': pass --store with activations of the SAE's model"
        )


def multi_hooks(cfg: dict) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Normalization]] | None:
    """(hooks encoded, hooks written, each hook's normalization) of a run over several hooks at once (a
    crosscoder or a CLT); None for an SAE or a transcoder."""
    if cfg.get("in_hooks") is None:
        return None
    norms = {hook: run_normalization(cfg["normalizations"], hook) for hook in cfg["normalizations"]}
    return tuple(cfg["in_hooks"]), tuple(cfg["out_hooks"]), norms


def check_compatible(sae: SparseAutoencoder, cfg: dict, store: ActivationStore) -> None:
    multi = multi_hooks(cfg)
    if multi is not None:  # a crosscoder or CLT: every hook, each at the width the SAE was trained on
        in_hooks, out_hooks, _ = multi
        if hasattr(sae, "hook_widths"):  # a crosscoder: its rows are its hooks' side by side
            widths = dict(zip(in_hooks, sae.hook_widths))
        else:
            widths = {hook: sae.d_in for hook in in_hooks} | {hook: sae.d_out for hook in out_hooks}
        for hook, width in widths.items():
            check_hook_and_width(f"the {cfg['sae']['arch']}", hook, width, store)
    elif cfg.get("in_hook") is not None:  # a transcoder: its input and output hooks
        check_hook_and_width("the transcoder", cfg["in_hook"], sae.d_in, store)
        check_hook_and_width("the transcoder", cfg["out_hook"], sae.d_out, store)
    else:
        check_hook_and_width("the SAE", cfg["hook"], sae.d_in, store)
    if store.header.model.name != cfg["store"]["model"]["name"]:
        raise SaepipeError(
            f"the SAE was trained on {cfg['store']['model']['name']} activations but the store holds "
            f"{store.header.model.name}: pass --store with a store of that model"
        )


@dataclass
class EvaluatedSAE:
    """What eval, report and compare need of a run folder: the SAE, the normalization mapping raw
    activations into the SAE's input space, the hook and the store it is evaluated on."""

    path: Path
    sae: SparseAutoencoder
    normalization: Normalization
    hook: str
    store_path: str
    model_name: str
    label: str  # a short name for tables and plots
    # A transcoder reads another hook than the one it writes (`hook`, whose normalization is above).
    read_hook: str | None = None
    read_normalization: Normalization | None = None
    # A crosscoder or CLT reads and writes several hooks: (in_hooks, out_hooks, normalization of each);
    # `hook` is then its first written hook.
    multi: tuple[tuple[str, ...], tuple[str, ...], dict[str, Normalization]] | None = None

    def inputs(self) -> list[tuple[str, Normalization]]:
        """The hooks the SAE encodes, each with the normalization mapping its raw rows into the SAE's input
        space: its hook; a transcoder's input hook; a crosscoder's or CLT's input hooks, side by side."""
        if self.multi is not None:
            in_hooks, _, norms = self.multi
            return [(hook, norms[hook]) for hook in in_hooks]
        if self.read_hook is not None:
            return [(self.read_hook, self.read_normalization)]
        return [(self.hook, self.normalization)]


def open_evaluated(run: str | Path, device: torch.device | str = "cpu", store_path: str | None = None) -> EvaluatedSAE:
    """A trained run folder (cfg.json + sae.safetensors), or an eval folder of an external SAE."""
    path = Path(run)
    if (path / run_dir.EXTERNAL).exists() and not (path / run_dir.CONFIG).exists():
        saved = run_dir.read_json(path / run_dir.EXTERNAL, "evaluate the SAE again with --external and --store")
        return open_external(saved["saelens_dir"], store_path or saved["store"], path, device)
    sae, cfg = load_sae(path, device)
    store = store_path or cfg["store"]["path"]
    hook, norm, read_hook, read_norm = run_hooks(cfg)
    model = cfg["store"]["model"]["name"]
    return EvaluatedSAE(path, sae, norm, hook, store, model, path.name, read_hook, read_norm, multi_hooks(cfg))


def open_external(saelens_dir: str | Path, store_path: str, out: Path, device: torch.device | str) -> EvaluatedSAE:
    """A SAELens-format SAE folder (cfg.json + sae_weights.safetensors), to be measured on our store. It
    reads raw activations, so its normalization is the identity, keeping the store's outlier bound: it is
    spliced and scored exactly where the store keeps rows."""
    folder = Path(saelens_dir)
    sae = load_saelens_sae(folder, device)
    store = open_store(store_path)
    hook = sae.inner.cfg.metadata.hook_name
    check_hook_and_width(f"the SAE at {folder}", hook, sae.d_in, store)
    identity = Normalization("none", max_norm=store.normalization(hook).max_norm)
    return EvaluatedSAE(out, sae, identity, hook, store.location, store.header.model.name, f"{folder.name} (external)")


def is_saelens_folder(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()


def load_saelens_sae(folder: Path, device: torch.device | str = "cpu") -> ExternalSAE:
    """A SAELens-format SAE folder (SAELens's own, or one `saepipe export` wrote), loaded by sae-lens."""
    folder = Path(folder)
    if not is_saelens_folder(folder):
        raise SaepipeError(
            f"{folder} is not a SAELens SAE folder (cfg.json and sae_weights.safetensors): "
            f"pass the folder SAELens's save_model / save_inference_model wrote"
        )
    try:
        from sae_lens import SAE
    except ImportError as e:
        raise SaepipeError("loading a SAELens SAE needs sae-lens: pip install 'sae-lens>=6'") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = SAE.load_from_disk(str(folder), device=str(device))
    return ExternalSAE(inner)
