"""Our transcoder beside sparsify's, trained on the same rows of the tiny model's MLP input and output and
scored by our eval, end to end (CE/KL included)."""

import json

import pytest
import torch

from benchmarks import quality_transcoder as qt
from stages import evaluate
from stages.train.config import TrainConfig
from store_schema.reader import open_store
from tests.conftest import MLP_IN, MLP_OUT

sparsify = pytest.importorskip("sparsify")


@pytest.fixture(scope="module")
def compared(mlp_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("qt") / "q"
    base = TrainConfig.from_flat(
        store=str(mlp_store), out=str(out), arch="transcoder", in_hook=MLP_IN, out_hook=MLP_OUT,
        width=128, tokens=40_960, batch_size=512, device="cpu", progress=False,
    )  # fmt: skip
    rows = qt.compare_with_sparsify(base, qt.TranscoderQualityConfig(k=8, eval_tokens=1024))
    return out, rows


def test_both_transcoders_are_trained_on_the_same_tokens_and_scored(mlp_store, compared):
    out, rows = compared
    assert [r["impl"].split()[0] for r in rows] == ["saepipe", "sparsify"]
    for row in rows:
        assert row["tokens"] == 40_960  # 80 batches of 512 rows each, the same batches for both
        assert row["l0"] == pytest.approx(8, abs=0.01)
        assert 0 < row["fve"] <= 1 and row["wall_s"] > 0
        # the rate is over the training loop alone, which ran within the wall time
        assert row["tokens_per_s"] >= row["tokens"] / row["wall_s"]
        assert 0 <= row["dead_fraction"] < 1
        assert row["ce_recovered"] > 0 and row["kl"] >= 0 and row["downstream_tokens"] > 0
    # the same held-out rows (all of the tiny store's, fewer than 1,024) and CE/KL tokens for both
    assert rows[0]["eval_rows"] == rows[1]["eval_rows"] == min(1024, open_store(mlp_store).n_rows("eval"))
    assert rows[0]["downstream_tokens"] == rows[1]["downstream_tokens"]
    saved = json.loads((out / "quality_transcoder.json").read_text())
    assert saved["rows"] == rows and saved["sparsify_decoder"] in ("eager_decode", "triton_decode")
    table = (out / "quality_transcoder.md").read_text()
    assert "| saepipe | transcoder |" in table and "| sparsify 1." in table


def test_sparsifys_transcoder_is_scored_as_its_own_forward_predicts(mlp_store, compared):
    out, rows = compared
    coder = sparsify.SparseCoder.load_from_disk(out / "sparsify-transcoder")
    assert coder.cfg.transcode and coder.num_latents == 128 and coder.cfg.k == 8
    store = open_store(mlp_store)
    n = rows[1]["eval_rows"]
    x, y = (torch.from_numpy(store.read_rows("eval", h, 0, n)).float() for h in (MLP_IN, MLP_OUT))
    wrapped = qt.SparsifyTranscoder(coder)
    with torch.no_grad():
        theirs = coder(x, y)
        assert torch.allclose(wrapped(x), theirs.sae_out, atol=1e-5)
        # the eval's fve is the complement of its own fvu on the same rows
        assert rows[1]["fve"] == pytest.approx(1 - float(theirs.fvu), abs=1e-4)
    # and it was trained: far better than its zero-initialized decoder (which predicts b_dec alone)
    assert rows[1]["fve"] > 0.3


def test_our_run_has_the_shared_width_and_k_and_sparsify_its_default_lr(compared):
    out, _ = compared
    cfg = json.loads((out / "ours-transcoder" / "cfg.json").read_text())
    assert cfg["sae"]["arch"] == "transcoder" and cfg["sae"]["d_sae"] == 128 and cfg["training"]["k"] == 8
    assert qt.sparsify_default_lr(128) == pytest.approx(5e-3 / (128 / 2**14) ** 0.5)


def test_a_missing_sparsify_is_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sparsify(name, *args, **kwargs):
        if name.startswith("sparsify"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sparsify)
    with pytest.raises(qt.SaepipeError, match="pip install --no-deps eai-sparsify==1.3.3"):
        qt.import_sparsify()


def test_wrapper_plugs_into_store_metrics(mlp_store, compared):
    out, rows = compared
    wrapped = qt.SparsifyTranscoder(sparsify.SparseCoder.load_from_disk(out / "sparsify-transcoder"))
    store = open_store(mlp_store)
    metrics, density = evaluate.store_metrics(
        wrapped, store, MLP_OUT, store.normalization(MLP_OUT), torch.device("cpu"), 1024, False, read_hook=MLP_IN
    )
    assert metrics["fve"] == pytest.approx(rows[1]["fve"]) and density.shape == (128,)
