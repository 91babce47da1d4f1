"""The TopK recipe: init, decoder constraint, AuxK, sparse decode, and recovery of planted features."""

import json
import subprocess
import sys

import pytest
import torch

from stages import train as train_stage
from stages.basics import run_dir
from stages.saes import TopKSAE
from stages.saes.base import TrainContext, geometric_median
from stages.saes.batchtopk import BatchTopKSAE
from stages.saes.matryoshka import MatryoshkaSAE
from stages.saes.saved import load_sae
from stages.train.config import TrainConfig
from store_schema.reader import open_store


def test_init_is_decoder_transpose_with_unit_rows():
    sae = TopKSAE(32, 128, 4)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # not tied


def test_sparse_decode_equals_dense_decode():
    sae = TopKSAE(16, 64, 5)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(10, 16)
    code = sae.encode(x)
    assert (code.dense(64) > 0).sum(dim=1).le(5).all()
    torch.testing.assert_close(sae.decode(code), code.dense(64) @ sae.W_dec + sae.b_dec)


def test_parallel_gradient_removed_and_norms_stay_one():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(32, 16)
        loss, _ = sae.training_loss(x, TrainContext(1.0, None, 0.0))
        opt.zero_grad()
        loss.backward()
        assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() > 1e-4  # there was a parallel part
        sae.remove_parallel_gradient()
        parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
        assert parallel.abs().max() < 1e-6
        opt.step()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_auxk_trains_only_dead_latents_on_the_residual():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 2, aux_k=8, aux_coef=1.0)
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    loss, metrics = sae.training_loss(x, TrainContext(1.0, dead, 0.0))
    assert metrics["aux_loss"] > 0
    main_only, _ = sae.training_loss(x, TrainContext(1.0, None, 0.0))
    (loss - main_only).backward()  # the gradient of the AuxK term alone
    alive_rows = sae.W_dec.grad[:40].abs().sum()
    assert alive_rows == 0 and sae.W_dec.grad[40:].abs().sum() > 0


@pytest.mark.parametrize("rows", [100, 512, 1100])
def test_top_pre_acts_in_blocks_selects_what_the_whole_matrix_does(rows):
    """The blocked selection (a CPU's float32 path) against top-k of the whole pre-activation matrix: the
    same latents and values per row, the dead latents' AuxK selection included."""
    from stages.saes.base import top_pre_acts

    gen = torch.Generator().manual_seed(rows)
    x, W, bias = (
        torch.randn(rows, 24, generator=gen),
        torch.randn(24, 300, generator=gen),
        torch.randn(300, generator=gen),
    )
    dead = torch.rand(300, generator=gen) < 0.2
    got = top_pre_acts(x, W, bias, 7, dead, 5)
    pre = torch.addmm(bias, x, W)
    for (values, indices), (want_values, want_indices) in (
        ((got.values, got.indices), pre.topk(7, dim=-1)),
        ((got.among_values, got.among_indices), pre.masked_fill(~dead, float("-inf")).topk(5, dim=-1)),
    ):
        order = values.argsort(dim=-1, descending=True)
        assert torch.equal(indices.gather(1, order), want_indices)
        torch.testing.assert_close(values.gather(1, order), want_values)
    assert bool(dead[got.among_indices].all())


def test_geometric_median_resists_outliers():
    points = torch.randn(500, 8) * 0.1 + 3.0
    points[:40] += 1000.0  # 8% far outliers drag the mean, not the median
    median = geometric_median(points)
    assert (median - 3.0).abs().max() < 0.1
    assert (points.mean(0) - 3.0).abs().max() > 50


def test_lr_schedule_warms_up_and_decays():
    f = train_stage.lr_schedule(100, 0.1, 0.2)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(50) == 1.0
    assert f(80) == pytest.approx(1.0) and f(90) == pytest.approx(0.5) and f(99) == pytest.approx(0.05)


def test_topk_recovers_planted_features(planted, tmp_path):
    features, store = planted
    cfg = TrainConfig.from_flat(
        store=str(store),
        out=str(tmp_path / "run"),
        hook="synthetic",
        width=512,
        k=8,
        tokens=480_000,
        batch_size=1024,
        lr=4e-3,
        progress=False,
    )
    train_stage.run_train(cfg)
    sae, saved = load_sae(tmp_path / "run")
    recovered = features.recovered_fraction(sae.W_dec.detach(), threshold=0.9)
    assert recovered >= 0.9, f"only {recovered:.1%} of planted features recovered at cosine >= 0.9"
    log = run_dir.read_log(tmp_path / "run")
    assert log[-1]["step"] == cfg.steps and log[-1]["fve"] > 0.8
    assert [row["step"] for row in log] == sorted({row["step"] for row in log})
    assert saved["finished"] and saved["sae"] == {
        "arch": "topk",
        "d_in": 64,
        "d_sae": 512,
        "k": 8,
        "aux_k": 32,
        "aux_coef": 1 / 32,
    }
    assert (tmp_path / "run" / "saelens" / "cfg.json").exists()
    assert not (tmp_path / "run" / run_dir.CHECKPOINT).exists()


def test_resume_after_interruption_matches_uninterrupted_run(planted, tmp_path, crash_training):
    _, store = planted
    common = dict(
        store=str(store),
        hook="synthetic",
        width=128,
        k=4,
        tokens=60 * 512,
        batch_size=512,
        lr=1e-3,
        progress=False,
        log_every=5,
        checkpoint_every=20,
    )
    train_stage.run_train(TrainConfig.from_flat(out=str(tmp_path / "whole"), **common))

    crash_training.arm(33)  # dies after 33 steps: the checkpoint at 20 survives
    with pytest.raises(crash_training.Crash):
        train_stage.run_train(TrainConfig.from_flat(out=str(tmp_path / "cut"), **common))
    crash_training.disarm()
    assert max(r["step"] for r in run_dir.read_log(tmp_path / "cut")) == 30  # logged past the checkpoint
    train_stage.run_train(TrainConfig.from_flat(out=str(tmp_path / "cut"), resume=True, **common))

    whole, _ = load_sae(tmp_path / "whole")
    resumed, _ = load_sae(tmp_path / "cut")
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)
    steps = [r["step"] for r in run_dir.read_log(tmp_path / "cut")]
    assert steps == list(range(5, 61, 5))  # no step logged twice, none missing


def test_training_never_imports_the_model_library(planted, tmp_path):
    _, store = planted
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "try:\n"
        f"    main(['train', {str(store)!r}, '--out', {str(tmp_path / 'run')!r}, '--width', '64', '--k', '4',"
        " '--tokens', '4096', '--batch-size', '1024', '--no-progress'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'transformers', 'sae_lens')]\n"
        "print(bad)\n"
        "assert not bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "run" / "cfg.json").read_text())["finished"]


def test_gradient_norm_is_clipped_in_summed_squared_error_units(planted, tmp_path, monkeypatch):
    """The gradient Adam sees is clipped at max_grad_norm / mse_scale (our loss divides by mse_scale);
    max_grad_norm=0 leaves it alone."""
    _, store = planted
    seen = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *a, **kw):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    common = dict(store=str(store), hook="synthetic", width=128, k=4, tokens=10 * 512, batch_size=512, progress=False)
    train_stage.run_train(TrainConfig.from_flat(out=str(tmp_path / "free"), max_grad_norm=0, **common))
    unclipped, seen[:] = list(seen), []
    _, mse_scale = train_stage.build_for_store(
        TrainConfig.from_flat(out="unused", **common), open_store(str(store)), torch.device("cpu")
    )
    cap = min(unclipped) / 2  # below every unclipped norm, so every step must be clipped to it
    train_stage.run_train(TrainConfig.from_flat(out=str(tmp_path / "clipped"), max_grad_norm=cap * mse_scale, **common))
    assert len(seen) == 10 and all(norm == pytest.approx(cap, rel=1e-4) for norm in seen)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TopKSAE(16, 64, k=4, aux_k=8),
        lambda: BatchTopKSAE(16, 64, k=4, aux_k=8),
        lambda: MatryoshkaSAE(16, 64, k=4, groups=(16, 64), aux_k=8),
    ],
    ids=["topk", "batchtopk", "matryoshka"],
)
@pytest.mark.parametrize("rows", [32, 1100])  # 1,100: TopK's selection in blocks of rows (two whole, one not)
def test_sparse_encoder_gradient_equals_dense_autograd(make, rows):
    """The encoder's gradient built from the selected entries only equals autograd through the dense
    pre-activations, for every parameter, the AuxK term included (some latents dead)."""
    torch.manual_seed(0)
    sae = make()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(rows, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True

    def grads():
        sae.zero_grad()
        loss, _ = sae.training_loss(x, TrainContext(mse_scale=16.0, dead=dead, progress=0.5))
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}

    sparse_loss, sparse = grads()
    sae.selected_pre_acts = lambda x, pre, indices: sae.pre_acts(x).gather(1, indices)  # the dense path
    sae.selected_values = lambda x, indices, values: sae.pre_acts(x).gather(1, indices)
    dense_loss, dense = grads()
    torch.testing.assert_close(sparse_loss, dense_loss)
    assert sparse.keys() == dense.keys() and sparse["W_enc"].abs().sum() > 0
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-6, msg=name)
