"""Training checkpoints that are safe to open: one safetensors file holding every tensor (the SAE, the
optimizer's state, the dead-latent clock) with, in its header, a JSON document holding the rest (step,
learning-rate schedule, optimizer settings, the store and configuration it belongs to).

Loading one runs no code, whoever wrote it. A pickle (what `torch.save` writes, and what earlier
saepipe versions wrote as `checkpoint.pt`) can run anything when unpickled, so a run folder from
someone else is never unpickled: its `checkpoint.pt` is refused."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from stages.basics import run_dir
from stages.basics.errors import SaepipeError

_META_KEY = "saepipe_checkpoint"
_SAE, _STATE, _CLOCK = "sae.", "optimizer.state.", "tokens_since_fired"


@dataclass
class Checkpoint:
    step: int
    sae: dict[str, torch.Tensor]
    optimizer: dict  # torch.optim.Optimizer.state_dict()
    scheduler: dict  # torch.optim.lr_scheduler.LRScheduler.state_dict()
    tokens_since_fired: torch.Tensor
    mse_scale: float
    store_fingerprint: str
    config: dict

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename): a kill leaves the previous checkpoint."""
        tensors = {_SAE + name: t for name, t in self.sae.items()}
        state_json = {}
        for index, state in self.optimizer["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{_STATE}{index}.{key}"] = value
                else:
                    state_json.setdefault(str(index), {})[key] = value
        tensors[_CLOCK] = self.tokens_since_fired
        document = {
            "step": self.step,
            "mse_scale": self.mse_scale,
            "store_fingerprint": self.store_fingerprint,
            "config": self.config,
            "optimizer": {"param_groups": self.optimizer["param_groups"], "state": state_json},
            "scheduler": self.scheduler,
        }
        tmp = path.with_name(path.name + ".tmp")
        run_dir.save_tensors(
            {name: t.detach().contiguous().cpu() for name, t in tensors.items()},
            tmp,
            metadata={_META_KEY: json.dumps(document)},
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Tensors on the CPU (the optimizer and the SAE move them where their parameters are)."""
        fix = "pass --overwrite to train again"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                document = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            return cls._from_parts(document, tensors)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise SaepipeError(f"the checkpoint {path} is damaged ({type(e).__name__}): {fix}") from None

    @classmethod
    def _from_parts(cls, document: dict, tensors: dict[str, torch.Tensor]) -> Checkpoint:
        """The checkpoint from its JSON document and tensors; a document of the wrong shape raises
        KeyError, TypeError or ValueError (a damaged checkpoint), never anything that runs on."""
        if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
            raise TypeError("the document is not a checkpoint's")
        step, mse_scale = document["step"], float(document["mse_scale"])
        if not (isinstance(step, int) and step >= 0 and math.isfinite(mse_scale) and mse_scale > 0):
            raise ValueError(f"step {step!r} or mse_scale {mse_scale!r} out of range")
        if not isinstance(document["store_fingerprint"], str):
            raise TypeError("store_fingerprint is not a string")
        state: dict[int, dict] = {int(i): dict(v) for i, v in document["optimizer"]["state"].items()}
        sae = {}
        for name, t in tensors.items():
            if name.startswith(_SAE):
                sae[name[len(_SAE) :]] = t
            elif name.startswith(_STATE):
                index, key = name[len(_STATE) :].split(".", 1)
                state.setdefault(int(index), {})[key] = t
        groups = [
            {**group, "betas": tuple(group["betas"])} if "betas" in group else group
            for group in document["optimizer"]["param_groups"]
        ]
        return cls(
            step=step,
            sae=sae,
            optimizer={"state": state, "param_groups": groups},
            scheduler=document["scheduler"],
            tokens_since_fired=tensors[_CLOCK],
            mse_scale=mse_scale,
            store_fingerprint=document["store_fingerprint"],
            config=document["config"],
        )
