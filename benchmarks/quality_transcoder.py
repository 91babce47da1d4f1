"""Our transcoder beside EleutherAI sparsify's (`eai-sparsify`, its `transcode` mode), trained on the same rows.

Both read a store of an MLP's input and output hooks (e.g. blocks.6.mlp.hook_in and blocks.6.hook_mlp_out),
with the same width, k and token budget, from the same batches in the same order: our loader
(store_schema.loader.batches_of) feeds our training loop and a step-by-step replica of sparsify's Trainer.
sparsify's Trainer gets its activations from forward hooks on the model; here its step is replayed on the
store's rows, with its own recipe otherwise (its defaults, what its users get):
- SparseCoder(transcode=True): the encoder an nn.Linear with its default init and a zero bias, the decoder
  starting at zero, no unit-norm decoder (its Trainer normalizes decoders only when autoencoding);
- on the first batch, the encoder bias set to -mean(x) W_encᵀ and b_dec to mean(y);
- the loss: fvu (summed squared error over the batch's total variance of y), plus auxk_alpha times its
  AuxK loss (auxk_alpha defaults to 0: off) and Multi-TopK (off by default);
- its default optimizer, "signum": ScheduleFreeWrapper(SignSGD, momentum 0.95) at 5e-3/√(width/2^14), with
  no schedule; the weights scored are the schedule-free average (optimizer.eval(), as it saves them).
Both are then scored by our eval: held-out fve, L0 and dead latents, and CE/KL with the predicted MLP output
spliced into the model. Needs eai-sparsify: `pip install --no-deps eai-sparsify==1.3.3 natsort schedulefree`.

Measured and compared: docs/quality.md, "Transcoder beside sparsify".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from benchmarks.quality import train_and_evaluate
from stages import evaluate
from stages.basics import run_dir
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.basics.settings import setting
from stages.saes.base import SparseAutoencoder, SparseCode
from stages.train.config import TrainConfig
from store_schema.loader import batches_of
from store_schema.reader import open_store

# sparsify is optional: imported by the functions that train or wrap its transcoder.

COLUMNS = ("fve", "nmse", "l0", "dead_fraction", "ce_recovered", "kl", "tokens_per_s", "wall_s")
INSTALL = "pip install --no-deps eai-sparsify==1.3.3 natsort schedulefree"


@dataclass
class TranscoderQualityConfig:
    """What the comparison runs, beside the training settings both sides share (a TrainConfig with
    in_hook, out_hook, width, tokens, batch_size; its lr is ours alone)."""

    k: int = setting(32, "active latents per token, for both")
    skip: bool = setting(False, "compare skip transcoders: ours --arch skip_transcoder, sparsify's skip_connection")
    sparsify_lr: float | None = setting(
        None, "sparsify's learning rate", shown_default="its default: 5e-3 / sqrt(width / 2^14) (signum)"
    )
    eval_tokens: int = setting(4096, "held-out tokens for every metric")
    use_model: bool = setting(True, "store-only metrics (no CE/KL)", flag="--no-model", inverted=True)
    auxk_alpha: float = 0.0  # sparsify's TrainConfig default: its AuxK loss is off unless this is > 0
    dead_feature_threshold: int = 10_000_000  # sparsify's default, in tokens (only AuxK reads it)


def import_sparsify():
    """The sparsify package, or a one-line error saying how to install it. Its import prints which sparse
    decoder it uses (Triton's when triton is installed, else torch's embedding_bag): kept quiet. Its Triton
    decoder takes CUDA tensors only, so without a GPU it is switched off by sparsify's own setting (a CPU
    machine with CUDA's torch and triton installed, like the copy of the GPU image, would fail otherwise)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import sparsify
            import sparsify.utils
    except ImportError as e:
        raise SaepipeError(f"comparing with sparsify needs eai-sparsify ({e}): {INSTALL}") from None
    return sparsify


def sparsify_decoder() -> str:
    """Which of sparsify's sparse decoders runs here: "triton_decode" or "eager_decode" (embedding_bag)."""
    return import_sparsify().utils.decoder_impl.__name__


class SparsifyTranscoder(SparseAutoencoder):
    """sparsify's SparseCoder in transcode mode behind our interface, for our eval: its encode (ReLU, then
    the top k) and its decode (its sparse decoder, plus b_dec), plus its skip connection when it has one.
    Its output is as wide as its input (sparsify's transcoder predicts a row of its input's width)."""

    arch = "external"
    transcodes = True

    def __init__(self, coder):
        nn.Module.__init__(self)  # no weights of our own: the wrapped coder holds them
        self.coder = coder
        self.d_in = self.d_out = int(coder.d_in)
        self.d_sae = int(coder.num_latents)

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 - the name every SAE library uses
        return self.coder.W_dec

    def encode(self, x: torch.Tensor) -> SparseCode:
        top_acts, top_indices, _ = self.coder.encode(x.to(self.coder.dtype))
        return SparseCode(top_acts, top_indices)

    def decode(self, code: SparseCode) -> torch.Tensor:
        return self.coder.decode(code.values, code.indices)

    def output(self, x: torch.Tensor, code: SparseCode) -> torch.Tensor:
        y = self.decode(code)
        return y if self.coder.W_skip is None else y + x.to(self.coder.dtype) @ self.coder.W_skip.mT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output hook's rows predicted from the input hook's x (what sparsify's forward calls sae_out)."""
        return self.output(x, self.encode(x))

    def config(self) -> dict:
        return {
            "arch": self.arch,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "d_out": self.d_out,
            "architecture": f"sparsify transcoder (k {self.coder.cfg.k}, skip {self.coder.W_skip is not None})",
        }


def sparsify_default_lr(width: int) -> float:
    """sparsify's Trainer's lr for its default optimizer (signum) when none is given."""
    return 5e-3 / (width / 2**14) ** 0.5


def train_sparsify(cfg: TrainConfig, qcfg: TranscoderQualityConfig, store, device: torch.device):
    """sparsify's transcoder trained as its Trainer.fit trains one (loss_fn "fvu", grad_acc_steps and
    micro_acc_steps 1, optimizer "signum"), on our batches of (in_hook, out_hook) in our order. Returns
    (coder, {"tokens", "wall_s", "loop_s"}): wall_s from building the coder to its final weights."""
    sparsify = import_sparsify()
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    started = time.perf_counter()
    previous_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as its fit() does (TF32 on CUDA; nothing changes on a CPU)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # its Trainer seeds each coder's initialization with init_seeds[0]
            coder_cfg = sparsify.SparseCoderConfig(
                num_latents=cfg.width, k=qcfg.k, transcode=True, skip_connection=qcfg.skip
            )
            coder = sparsify.SparseCoder(store.width(cfg.in_hook), coder_cfg, device, dtype=torch.float32)
        lr = qcfg.sparsify_lr or sparsify_default_lr(coder.num_latents)
        optimizer = ScheduleFreeWrapper(SignSGD([dict(params=coder.parameters(), lr=lr)]), momentum=0.95)
        optimizer.train()
        tokens_since_fired = torch.zeros(coder.num_latents, dtype=torch.long, device=device)
        did_fire = torch.zeros(coder.num_latents, dtype=torch.bool, device=device)
        tokens = 0
        loader = batches_of(
            store, (cfg.in_hook, cfg.out_hook), cfg.batch_size, device=device, seed=cfg.seed, resident=cfg.resident
        )
        batches = loader.batches(0)
        loop_started = time.perf_counter()
        try:
            for step in range(cfg.steps):
                x, y = next(batches)
                if step == 0:  # its hook on the first batch: centred pre-activations, b_dec at y's mean
                    coder.encoder.bias.data = -x.mean(0).to(coder.dtype) @ coder.encoder.weight.data.T
                    coder.b_dec.data = y.mean(0).to(coder.dtype)
                dead = tokens_since_fired > qcfg.dead_feature_threshold if qcfg.auxk_alpha > 0 else None
                total_variance = (y - y.mean(0)).pow(2).sum()
                out = coder(x=x, y=y, dead_mask=dead, total_variance=total_variance)
                did_fire[out.latent_indices.flatten()] = True
                loss = out.fvu + qcfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
                loss.backward()
                # (its decoder-direction gradient projection runs only for autoencoders, not transcoders)
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    tokens_since_fired += x.shape[0]
                    tokens_since_fired[did_fire] = 0
                    did_fire.zero_()
                tokens += x.shape[0]
        finally:
            batches.close()
        loop_s = time.perf_counter() - loop_started
        optimizer.eval()  # the schedule-free average: the weights its checkpoints save
    finally:
        torch.set_float32_matmul_precision(previous_precision)
    return coder.eval(), {"tokens": tokens, "wall_s": time.perf_counter() - started, "loop_s": loop_s}


def _ours_config(base: TrainConfig, qcfg: TranscoderQualityConfig) -> TrainConfig:
    arch = "skip_transcoder" if qcfg.skip else "transcoder"
    return base.replaced(
        arch=arch, activation="topk", k=qcfg.k, hook=None, out=str(Path(base.out) / f"ours-{arch}"), overwrite=True
    )


def _loop_seconds(run: Path) -> tuple[int, float]:
    """(tokens, seconds) of our training loop, from its log's windows (it_per_s over the steps of each)."""
    rows = run_dir.read_log(run)
    seconds, last = 0.0, 0
    for row in rows:
        seconds += (row["step"] - last) / row["it_per_s"]
        last = row["step"]
    return rows[-1]["tokens"], seconds


def compare_with_sparsify(base: TrainConfig, qcfg: TranscoderQualityConfig) -> list[dict]:
    """Train our transcoder and sparsify's on the same rows, score both with our eval, and write
    quality_transcoder.json and quality_transcoder.md into base.out. Returns the two rows."""
    import_sparsify()  # refused before any work when it is missing
    ours_cfg = _ours_config(base, qcfg).validate()
    store = open_store(base.store)
    store.require_complete()
    for hook in ours_cfg.read_hooks:
        store.require_hook(hook)
    in_hook, out_hook = ours_cfg.in_hook, ours_cfg.out_hook
    if store.width(in_hook) != store.width(out_hook):
        raise SaepipeError(
            f"sparsify's transcoder predicts a row as wide as its input, but {in_hook} has width "
            f"{store.width(in_hook)} and {out_hook} {store.width(out_hook)}: compare hooks of one width"
        )
    device = resolve_device(base.device)
    out = Path(base.out)

    ours, ours_wall = train_and_evaluate(ours_cfg, qcfg.eval_tokens, qcfg.use_model)
    ours_tokens, ours_loop = _loop_seconds(Path(ours_cfg.out))
    rows = [
        {
            "impl": "saepipe",
            "arch": ours_cfg.arch,
            **_pick(ours),
            "tokens": ours_tokens,
            "tokens_per_s": ours_tokens / ours_loop,
            "wall_s": ours_wall,
            "lr": ours_cfg.resolved_lr(),
        }
    ]

    coder, timing = train_sparsify(ours_cfg, qcfg, store, device)
    coder.save_to_disk(out / "sparsify-transcoder")  # its own format: sparsify.SparseCoder.load_from_disk
    theirs = SparsifyTranscoder(coder)
    out_norm, in_norm = store.normalization(out_hook), store.normalization(in_hook)
    metrics, _ = evaluate.store_metrics(
        theirs, store, out_hook, out_norm, device, qcfg.eval_tokens, base.progress, read_hook=in_hook
    )
    if qcfg.use_model:
        host = evaluate.load_eval_model(store, None, device)
        metrics |= evaluate.downstream_metrics(
            theirs, store, out_hook, out_norm, host, device, qcfg.eval_tokens,
            progress=base.progress, read=(in_hook, in_norm),
        )  # fmt: skip
    rows.append(
        {
            "impl": f"sparsify {version('eai-sparsify')}",
            "arch": "transcoder (skip_connection)" if qcfg.skip else "transcoder",
            **_pick(metrics),
            "tokens": timing["tokens"],
            "tokens_per_s": timing["tokens"] / timing["loop_s"],
            "wall_s": timing["wall_s"],
            "lr": qcfg.sparsify_lr or sparsify_default_lr(coder.num_latents),
        }
    )
    run_dir.write_json_atomic(
        out / "quality_transcoder.json",
        {
            "store": base.store,
            "in_hook": in_hook,
            "out_hook": out_hook,
            "width": base.width,
            "k": qcfg.k,
            "tokens": base.steps * base.batch_size,
            "batch_size": base.batch_size,
            "eval_tokens": qcfg.eval_tokens,
            "device": str(device),
            "sparsify_decoder": sparsify_decoder(),
            "sparsify_recipe": {"optimizer": "signum (schedule-free SignSGD, momentum 0.95)", "loss": "fvu"}
            | {"auxk_alpha": qcfg.auxk_alpha, "dead_feature_threshold": qcfg.dead_feature_threshold},
            "torch": torch.__version__,
            "rows": rows,
        },
    )
    (out / "quality_transcoder.md").write_text(format_table(rows) + "\n")
    return rows


def _pick(metrics: dict) -> dict:
    keys = ("fve", "nmse", "l0", "dead_fraction", "ce_recovered", "kl", "downstream_tokens", "eval_rows")
    return {key: metrics.get(key, float("nan")) for key in keys}


def format_table(rows: list[dict]) -> str:
    lines = [
        "| implementation | arch | " + " | ".join(COLUMNS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for r in rows:
        cells = [f"{r[c]:,.0f}" if c == "tokens_per_s" else f"{r[c]:.4g}" for c in COLUMNS]
        lines.append(f"| {r['impl']} | {r['arch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_rows(out: Path) -> list[dict]:
    return json.loads((Path(out) / "quality_transcoder.json").read_text())["rows"]
