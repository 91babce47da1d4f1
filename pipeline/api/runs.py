"""A trained SAE as a torch module that reads the model's raw activations: from a saepipe run folder (its
store's normalization applied on the way in and inverted on the way out) or a SAELens-format folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from stages.basics import run_dir
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.basics.eval_record import read_eval
from stages.evaluate.evaluated import is_saelens_folder, load_saelens_sae, recorded_hooks
from stages.saes import SparseAutoencoder
from stages.saes.base import DenseCode
from stages.saes.io import HookIO
from stages.saes.saved import load_sae
from store_schema.normalization import Normalization


class JoinedNormalization:
    """The normalizations of several hooks whose rows sit side by side (a crosscoder's or CLT's), applied
    and inverted block by block: what TrainedSAE needs of a Normalization."""

    has_row_stats = False  # load_run refuses stores normalized per token for these runs

    def __init__(self, norms: list[Normalization], widths: list[int]):
        self.norms, self.widths = norms, widths

    def apply(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.cat([n.apply(part)[0] for n, part in zip(self.norms, x.split(self.widths, dim=-1))], -1), None

    def invert(self, x_hat: torch.Tensor, row_stats: None = None) -> torch.Tensor:
        return torch.cat([n.invert(part) for n, part in zip(self.norms, x_hat.split(self.widths, dim=-1))], -1)


class TrainedSAE(nn.Module):
    """An SAE on raw activations [..., d_in]: ``encode`` gives dense latents [..., d_sae], ``decode`` maps
    latents back to raw activations, ``forward`` reconstructs. ``sae`` is the module itself, acting on the
    store's normalized rows, and ``normalization`` the map between the two.

    A transcoder reads ``in_hook`` and writes ``hook`` (its output hook): ``forward`` predicts the output
    hook's raw activations [..., d_out] from the input hook's, and ``out_normalization`` maps its output.
    A crosscoder or CLT reads the raw rows of ``in_hooks`` side by side and writes those of ``out_hooks``
    (a crosscoder: the same hooks; a CLT: each layer's MLP output)."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        normalization: Normalization,
        hook: str,
        config: dict,
        eval_results: dict | None,
        path: Path,
        in_hook: str | None = None,
        out_normalization: Normalization | None = None,
        in_hooks: tuple[str, ...] | None = None,
        out_hooks: tuple[str, ...] | None = None,
    ):
        super().__init__()
        self.sae, self.normalization, self.hook, self.in_hook = sae, normalization, hook, in_hook
        self.in_hooks, self.out_hooks = in_hooks, out_hooks
        self.out_normalization = normalization if out_normalization is None else out_normalization
        self.config, self.eval_results, self.path = config, eval_results, path

    @property
    def d_out(self) -> int:
        """The width of what forward writes (a CLT: all its layers' outputs side by side)."""
        if self.sae.n_layers:
            return self.sae.n_layers * self.sae.d_out
        return self.sae.W_dec.shape[1]

    @property
    def d_in(self) -> int:
        """The width of what the module reads (a CLT: all its layers' inputs side by side)."""
        return self.sae.d_in * (self.sae.n_layers or 1)

    @property
    def d_sae(self) -> int:
        return self.sae.d_sae

    @property
    def arch(self) -> str:
        """Our architecture name (topk, ...), or "saelens <its architecture>" for a SAELens folder."""
        return self.sae.display_arch

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [..., d_in] -> latent activations [..., d_sae] (dense)."""
        flat, _ = self._normalized(x)
        return self.sae.encode(flat).dense(self.d_sae).reshape(*x.shape[:-1], self.d_sae)

    def decode(self, latents: torch.Tensor, row_stats: torch.Tensor | None = None) -> torch.Tensor:
        """Latent activations [..., d_sae] -> raw activations [..., d_in]. A store normalized per token
        (mode token) needs each row's (mean, scale), which only `forward` has: pass them as `row_stats`."""
        if self.out_normalization.has_row_stats and row_stats is None:
            raise ValueError(
                "this SAE's store normalizes each token by its own mean and scale: decode needs them as "
                "row_stats (Normalization.apply returns them), or call the module on raw rows instead"
            )
        if self.in_hook is not None and getattr(self.sae, "skip", False):
            raise ValueError("a skip transcoder's output needs its input too: call the module on the input rows")
        x_hat = self.sae.decode(DenseCode(latents.reshape(-1, self.d_sae)))
        return self.out_normalization.invert(x_hat, row_stats).reshape(*latents.shape[:-1], self.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [..., d_in] -> their reconstruction (a transcoder: its output hook's prediction
        [..., d_out]), in raw units."""
        flat, row_stats = self._normalized(x)
        x_hat = self.sae.output(flat, self.sae.encode(flat))
        if self.in_hook is not None or self.in_hooks is not None:  # the input's per-row stats do not apply
            return self.out_normalization.invert(x_hat).reshape(*x.shape[:-1], self.d_out)
        return self.normalization.invert(x_hat, row_stats).reshape(*x.shape[:-1], x_hat.shape[-1])

    def _normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"this SAE reads rows of width {self.d_in}; got a tensor of shape {tuple(x.shape)}")
        return self.normalization.apply(x.reshape(-1, self.d_in).float())

    def __repr__(self) -> str:
        return f"TrainedSAE({self.arch}, d_in={self.d_in}, d_sae={self.d_sae}, hook={self.hook!r}, from {self.path})"


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedSAE:
    """The SAE of a finished saepipe run folder (cfg.json + sae.safetensors), with its config and its
    eval.json if `saepipe eval` ran; or of a SAELens-format folder (cfg.json + sae_weights.safetensors,
    e.g. a run's saelens/ export), which needs sae-lens and reads raw activations as they are."""
    folder, device = Path(path), resolve_device(str(device))
    if (folder / run_dir.SAE_WEIGHTS).exists() or (folder / run_dir.CHECKPOINT).exists():
        sae, cfg = load_sae(folder, device)
        io, norms = recorded_hooks(sae, cfg, folder)
        if not io.single:
            return _multi_hook_run(sae, cfg, io, norms, folder)
        (read,), (write,) = io.reads, io.writes  # a transcoder reads another hook than it writes
        in_hook = read if io.transcodes else None
        evals = _eval_results(folder)
        return TrainedSAE(sae, norms[read], write, cfg, evals, folder, in_hook, out_normalization=norms[write])
    if is_saelens_folder(folder):
        sae = load_saelens_sae(folder, device)
        cfg = json.loads((folder / "cfg.json").read_text())
        hook = sae.inner.cfg.metadata.hook_name
        return TrainedSAE(sae, Normalization("none"), hook, cfg, None, folder)
    raise SaepipeError(
        f"{folder} is neither a saepipe run folder ({run_dir.SAE_WEIGHTS}) nor a SAELens SAE folder "
        f"(sae_weights.safetensors): pass the folder `saepipe train --out` wrote, or its saelens/ export"
    )


def _multi_hook_run(
    sae: SparseAutoencoder, cfg: dict, io: HookIO, norms: dict[str, Normalization], folder: Path
) -> TrainedSAE:
    """A crosscoder or CLT on raw rows: each hook's block normalized and mapped back by its own."""
    in_hooks, out_hooks = io.reads, io.writes
    per_token = [hook for hook, norm in norms.items() if norm.has_row_stats]
    if per_token:
        raise SaepipeError(
            f"{folder}: its store normalizes {per_token[0]} per token (mode token), which a {sae.arch} on raw rows "
            f"cannot invert; read the store's normalized rows and call the module `.sae` on them instead"
        )
    widths = sae.widths_at(io)
    widths_in, widths_out = [widths[h] for h in in_hooks], [widths[h] for h in out_hooks]
    joined_in = JoinedNormalization([norms[h] for h in in_hooks], widths_in)
    joined_out = JoinedNormalization([norms[h] for h in out_hooks], widths_out)
    return TrainedSAE(
        sae, joined_in, out_hooks[0], cfg, _eval_results(folder), folder,
        out_normalization=joined_out, in_hooks=in_hooks, out_hooks=out_hooks,
    )  # fmt: skip


def _eval_results(folder: Path) -> dict | None:
    path = folder / run_dir.EVAL
    if not path.exists():
        return None
    return read_eval(path, f"evaluate the run again (saepipe eval {folder})")
