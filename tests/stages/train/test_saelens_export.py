"""stages.train.saelens_export: an exported SAE, loaded by SAELens 6.x, must encode and decode raw activations
as our SAE does on normalized ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.saes.base import SparseAutoencoder
from stages.saes.topk import TopKSAE
from stages.train.saelens_export import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, export_saelens, fold_normalization
from store_schema.normalization import Normalization
from tests.helpers.saes import trained_like

sae_lens = pytest.importorskip("sae_lens")  # slow import: once per module
from sae_lens.saes.topk_sae import TopKSAE as SAELensTopKSAE  # noqa: E402

D_IN, D_SAE, K = 32, 128, 8
META = {
    "hook_name": "blocks.3.hook_resid_post",
    "model_name": "tiny-model",
    "context_size": 128,
    "dataset": "some/dataset",
}


@pytest.fixture(scope="module")
def sae() -> TopKSAE:
    return trained_like(TopKSAE(D_IN, D_SAE, K))  # trained SAEs have nonzero biases and an encoder that is not W_decᵀ


def raw_activations(sigma: float = 2.0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mu_raw = 3.0 * torch.randn(D_IN, generator=gen)
    return mu_raw + sigma * torch.randn(64, D_IN, generator=gen), mu_raw


def center_scale(mu_raw: torch.Tensor) -> Normalization:
    mean = (mu_raw + 0.2 * torch.randn(D_IN, generator=torch.Generator().manual_seed(2))).numpy()
    return Normalization("center-scale", mean.astype(np.float32), float(np.float32(0.37)))


def ours(sae: SparseAutoencoder, norm: Normalization, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_hat, stats = norm.apply(x)
    with torch.no_grad():
        code = sae.encode(x_hat)
        return code.dense(sae.d_sae), norm.invert(sae.decode(code), stats)


def theirs(out_dir, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = sae_lens.SAE.load_from_disk(out_dir)
    assert isinstance(loaded, SAELensTopKSAE)
    with torch.no_grad():
        z = loaded.encode(x)
        return z, loaded.decode(z)  # layer_norm: decode reuses the row stats of the encode just before


def assert_matches(z_ours, rec_ours, z_sl, rec_sl, rtol=1e-4, atol_factor=1e-6):
    assert torch.equal(z_ours > 0, z_sl > 0), "SAELens picked different latents"
    torch.testing.assert_close(z_sl, z_ours, rtol=rtol, atol=atol_factor * float(z_ours.abs().max()))
    torch.testing.assert_close(rec_sl, rec_ours, rtol=rtol, atol=atol_factor * float(rec_ours.abs().max()))


@pytest.mark.parametrize("mode", ["center-scale", "none"])
def test_folded_export_matches_our_sae_on_raw_activations(tmp_path, sae, mode):
    x, mu_raw = raw_activations()
    norm = center_scale(mu_raw) if mode == "center-scale" else Normalization("none")
    out = export_saelens(tmp_path / "export", sae, norm, **META)
    assert out == tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == [SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left behind

    z_ours, rec_ours = ours(sae, norm, x)
    z_sl, rec_sl = theirs(out, x)
    assert (z_ours > 0).sum(dim=1).float().mean() > K / 2  # the comparison covers real codes
    # Measured: ~1e-7 relative (float32 rounding of the float64 fold); 1e-4 leaves ample room.
    assert_matches(z_ours, rec_ours, z_sl, rec_sl)


def test_the_exported_cfg_json_records_the_architecture_shape_and_metadata_and_loads_in_saelens(tmp_path, sae):
    """cfg.json states the architecture, k, shape, dtype and (folded, so none) normalization, the hook, model,
    dataset and context metadata, extra metadata and our own normalization record; SAELens loads it back."""
    out = export_saelens(
        tmp_path / "e",
        sae,
        center_scale(raw_activations()[1]),
        **META,
        extra_metadata={"model_class_name": "HookedTransformer"},
    )
    cfg = json.loads((out / SAE_CFG_FILENAME).read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    meta = cfg["metadata"]
    assert meta["hook_name"] == META["hook_name"] and meta["model_name"] == META["model_name"]
    assert meta["context_size"] == 128 and meta["dataset_path"] == "some/dataset" and meta["prepend_bos"] is True
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert meta["model_class_name"] == "HookedTransformer"
    assert meta["saepipe"]["normalization"]["mode"] == "center-scale"

    loaded = sae_lens.SAE.load_from_disk(out)
    assert loaded.cfg.k == K and loaded.cfg.metadata.hook_name == META["hook_name"]
    assert loaded.cfg.metadata.context_size == 128 and loaded.cfg.metadata.dataset_path == "some/dataset"
    assert loaded.W_enc.dtype == torch.float32


@pytest.mark.parametrize("sigma", [2.0, 0.05])
def test_token_export_uses_layer_norm_within_its_eps_bound(tmp_path, sae, sigma):
    """SAELens's layer_norm divides by (unbiased std + 1e-5), ours by (biased std + 1e-6); the constant
    √(d/(d−1)) is folded, the eps difference is not. Measured over row spreads σ from 1e-3 to 10: the
    relative error of codes and of reconstructions (against the row's deviation from its mean) is
    ≤ 1.06e-5/σ, so rows are checked against 2e-5/σ (+2e-6 for float32 rounding)."""
    gen = torch.Generator().manual_seed(3)
    x = 5.0 * torch.randn(64, 1, generator=gen) + sigma * torch.randn(64, D_IN, generator=gen)
    norm = Normalization("token")
    out = export_saelens(tmp_path / "tok", sae, norm, **META)
    assert json.loads((out / SAE_CFG_FILENAME).read_text())["normalize_activations"] == "layer_norm"

    z_ours, rec_ours = ours(sae, norm, x)
    z_sl, rec_sl = theirs(out, x)
    row_sigma = norm.apply(x)[1][:, 1]
    bound = 2e-5 / row_sigma + 2e-6
    assert torch.equal(z_ours > 0, z_sl > 0)
    z_err = (z_sl - z_ours).norm(dim=1) / z_ours.norm(dim=1)
    rec_err = (rec_sl - rec_ours).norm(dim=1) / (rec_ours - rec_ours.mean(dim=1, keepdim=True)).norm(dim=1)
    assert (z_err <= bound).all(), float((z_err / bound).max())
    assert (rec_err <= bound).all(), float((rec_err / bound).max())
    if sigma >= 1:
        # Ordinary activations: elementwise rtol 1e-4 holds, with atol 1e-5 of the magnitude (the error is
        # ~5e-6 of each row's spread, so near-zero entries of a row need an absolute allowance).
        assert_matches(z_ours, rec_ours, z_sl, rec_sl, atol_factor=1e-5)


def test_fold_normalization(sae):
    weights = {k: getattr(sae, k).detach().clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    x, mu_raw = raw_activations()
    norm = center_scale(mu_raw)
    folded = fold_normalization(weights, norm)
    assert all(v.dtype == torch.float32 for v in folded.values())
    torch.testing.assert_close(folded["b_enc"], weights["b_enc"])
    with torch.no_grad():  # raw-space pre-activations equal normalized-space ones
        pre_raw = (x - folded["b_dec"]) @ folded["W_enc"] + folded["b_enc"]
        torch.testing.assert_close(pre_raw, sae.pre_acts(norm.apply(x)[0]), rtol=1e-5, atol=1e-5)

    plain = fold_normalization(weights, Normalization("none"))
    assert all(torch.equal(plain[k], weights[k]) for k in weights)
    plain["W_enc"].zero_()
    assert weights["W_enc"].abs().sum() > 0  # a copy, not a view
    with pytest.raises(ValueError, match="per-row"):
        fold_normalization(weights, Normalization("token"))
    with pytest.raises(ValueError, match="W_dec"):
        fold_normalization({k: v for k, v in weights.items() if k != "W_dec"}, norm)


def test_overwrites_an_export_but_not_other_directories(tmp_path, sae):
    out = tmp_path / "e"
    export_saelens(out, sae, Normalization("none"), **META)
    export_saelens(out, sae, Normalization("token"), **META)
    assert json.loads((out / SAE_CFG_FILENAME).read_text())["normalize_activations"] == "layer_norm"
    assert [p.name for p in tmp_path.iterdir()] == ["e"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a SAELens export"):
        export_saelens(other, sae, Normalization("none"), **META)
    assert (other / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "other"]


def test_unknown_architecture_is_refused(tmp_path):
    class Odd(SparseAutoencoder):
        arch = "odd"

    with pytest.raises(ValueError, match="cannot export 'odd'"):
        export_saelens(tmp_path / "x", Odd(4, 8), Normalization("none"), **META)
    assert not (tmp_path / "x").exists()
