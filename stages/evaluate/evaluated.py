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
from stages.saes.io import HookIO
from stages.saes.saved import load_sae
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore, open_store

# sae_lens is optional (the test extra): imported only to evaluate an SAE trained with it.


def normalization_of(record: dict) -> Normalization:
    """A normalization as a run's cfg.json records it (stages.train.loop writes it)."""
    mean = None if record.get("mean") is None else np.asarray(record["mean"], np.float32)
    return Normalization(record["mode"], mean, float(record["scale"]), record.get("max_norm"))


def run_normalization(cfg: dict) -> Normalization:
    """The normalization of the hook a run reads (a transcoder's input hook)."""
    return normalization_of(cfg["normalization"])


def recorded_hooks(
    sae: SparseAutoencoder, cfg: dict, run: Path | str = "the run"
) -> tuple[HookIO, dict[str, Normalization]]:
    """(the hooks a run's SAE reads and writes, each hook's normalization) as its cfg.json records them;
    a record that is not there, or not usable, is a damaged run folder (`run`: how to name it)."""
    try:
        io, records = type(sae).recorded_io(cfg)
        norms = {hook: normalization_of(record) for hook, record in records.items()}
        problem = next((f"{hook}: {n.problem()}" for hook, n in norms.items() if n.problem() is not None), None)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise SaepipeError(
            f"{run}/{run_dir.CONFIG} does not record usable hooks and normalizations ({problem}): the run folder "
            f"is damaged; train it again (saepipe train ... --overwrite)"
        )
    return io, norms


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


def check_compatible(evaluated: EvaluatedSAE, store: ActivationStore) -> None:
    """The store holds every hook the SAE reads and writes, at its width, from the SAE's model; and when the
    run recorded it, it is the very store the run was trained on."""
    check_same_store(store, evaluated.store_fingerprint, evaluated.path, evaluated.store_config_fingerprint)
    sae, io = evaluated.sae, evaluated.io
    which = "the SAE" if io.single and not io.transcodes else f"the {sae.arch}"
    for hook, width in sae.widths_at(io).items():
        check_hook_and_width(which, hook, width, store)
    if store.header.model.name != evaluated.model_name:
        raise SaepipeError(
            f"the SAE was trained on {evaluated.model_name} activations but the store holds "
            f"{store.header.model.name}: pass --store with a store of that model"
        )


def require_store_there(location: str, run: Path) -> None:
    """The store a run recorded is still where it was; if not, say how to point the run at a copy."""
    if "://" not in location and not Path(location).exists():
        raise SaepipeError(
            f"the store {location} that {run} recorded is gone: evaluate on a copy of it with "
            f"`saepipe eval {run} --store COPY` (the report then uses it too), or collect it again with its command"
        )


def check_same_store(store: ActivationStore, expected: str | None, run: Path, config: str | None = None) -> None:
    """A store found where a run recorded one is the store it recorded (`expected`: its fingerprint), not one
    collected again or replaced there since: its held-out rows could be the SAE's training rows. The store
    grown by `collect --append` since (the same configuration, `config`) is the same store: an append keeps
    every row and held-out context it had."""
    grown = config is not None and bool(store.header.appends) and config in store.header.config_fingerprints()
    if expected is not None and store.fingerprint != expected and not grown:
        raise SaepipeError(
            f"{store.location} is not the store {run} recorded (fingerprint {store.fingerprint}, recorded "
            f"{expected}): it was collected again or replaced since; put that store back, or evaluate on this "
            f"one with `saepipe eval {run} --store {store.location}`"
        )


@dataclass
class EvaluatedSAE:
    """What eval, report and compare need of a run folder: the SAE, the hooks it reads and writes with the
    normalization mapping each hook's raw activations into the SAE's space, and the store it is evaluated
    on."""

    path: Path
    sae: SparseAutoencoder
    io: HookIO
    normalizations: dict[str, Normalization]
    store_path: str
    model_name: str
    label: str  # a short name for tables and plots
    # the fingerprints (of its rows, of its configuration) of the store at `store_path` as the run recorded
    # them (it was trained on that store); None when the store was named by the user (--store), or external
    store_fingerprint: str | None = None
    store_config_fingerprint: str | None = None

    @property
    def hook(self) -> str:
        """The (first) hook it writes: where it is spliced and scored."""
        return self.io.writes[0]

    @property
    def normalization(self) -> Normalization:
        return self.normalizations[self.hook]

    @property
    def read_hook(self) -> str | None:
        """The hook a transcoder reads (its input); None where the SAE reads what it writes."""
        return self.io.reads[0] if self.io.single and self.io.transcodes else None

    @property
    def read_normalization(self) -> Normalization | None:
        return None if self.read_hook is None else self.normalizations[self.read_hook]

    def inputs(self) -> list[tuple[str, Normalization]]:
        """The hooks the SAE encodes, each with the normalization mapping its raw rows into the SAE's input
        space: its hook; a transcoder's input hook; a crosscoder's or CLT's input hooks, side by side."""
        return [(hook, self.normalizations[hook]) for hook in self.io.reads]


def open_evaluated(run: str | Path, device: torch.device | str = "cpu", store_path: str | None = None) -> EvaluatedSAE:
    """A trained run folder (cfg.json + sae.safetensors), or an eval folder of an external SAE."""
    path = Path(run)
    if (path / run_dir.EXTERNAL).exists() and not (path / run_dir.CONFIG).exists():
        saved = run_dir.read_json(path / run_dir.EXTERNAL, "evaluate the SAE again with --external and --store")
        return open_external(saved["saelens_dir"], store_path or saved["store"], path, device)
    sae, cfg = load_sae(path, device)
    io, norms = recorded_hooks(sae, cfg, path)
    store = store_path or cfg["store"]["path"]
    recorded = (None, None) if store_path else (cfg["store"].get("fingerprint"), cfg["store"].get("config_fingerprint"))
    return EvaluatedSAE(path, sae, io, norms, store, cfg["store"]["model"]["name"], path.name, *recorded)


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
    io = HookIO((hook,), (hook,))
    label = f"{folder.name} (external)"
    return EvaluatedSAE(out, sae, io, {hook: identity}, store.location, store.header.model.name, label)


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
