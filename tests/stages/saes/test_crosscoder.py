"""Crosscoders (stages/saes/crosscoder.py): one latent space over several hooks, trained through the real
loop from a store whose hooks' rows side by side are built from planted features, some in one hook only."""

import pytest
import torch

from stages import train as train_stage
from stages.basics import run_dir
from stages.saes.saved import load_sae
from stages.train import sweeps
from stages.train.config import TrainConfig
from tests.helpers.planted import planted_crosscoder_store
from tests.helpers.resume import assert_resume_is_bit_identical

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    return planted_crosscoder_store(tmp_path_factory.mktemp("cc") / "s.zarr", 120_000, 4096)


def crosscoder_config(store, out, activation="topk", **settings) -> TrainConfig:
    values = dict(width=512, tokens=960_000, batch_size=1024, lr=4e-3)  # 8 epochs
    values |= {"k": 8} if activation in ("topk", "batchtopk") else {}
    values |= {"l1_coef": 0.1} if activation == "relu" else {}
    return TrainConfig.from_flat(
        store=str(store), out=str(out), arch="crosscoder", activation=activation, hooks=("a", "b"),
        progress=False, **(values | settings),
    )  # fmt: skip


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_a_crosscoder_recovers_shared_and_hook_only_features(hooks, tmp_path, activation):
    truth, store = hooks
    train_stage.run_train(crosscoder_config(store, tmp_path / "run", activation=activation))
    cc, saved = load_sae(tmp_path / "run")
    assert (cc.d_in, cc.d_sae, cc.hook_widths) == (64, 512, (32, 32)) and cc.W_dec.shape == (512, 64)
    decoder = cc.W_dec.detach()
    recovered = truth.recovered_fraction(decoder)
    assert recovered >= 0.9, f"{activation}: only {recovered:.1%} of planted features recovered at cosine >= 0.9"
    only_a = torch.from_numpy(truth.directions[:, 32:]).norm(dim=1) == 0
    assert truth.recovered_fraction(decoder, features=only_a.numpy()) >= 0.9  # features of one hook alone
    assert saved["sae"]["arch"] == "crosscoder" and saved["sae"]["activation"] == activation
    assert saved["in_hooks"] == saved["out_hooks"] == ["a", "b"] and saved["hook"] is None
    assert not (tmp_path / "run" / run_dir.SAELENS).exists()  # SAELens has no crosscoder format


def test_a_resumed_crosscoder_continues_bit_identically(hooks, tmp_path, crash_training):
    _, store = hooks
    short = dict(tokens=40_960, checkpoint_every=10)
    assert_resume_is_bit_identical(
        lambda out, **values: crosscoder_config(store, out, **values), tmp_path, crash_training, **short
    )


def test_a_crosscoder_sweep_varies_the_activation(hooks, tmp_path):
    _, store = hooks
    base = crosscoder_config(store, tmp_path / "sweep", tokens=20_480)
    outs = train_stage.run_sweep(sweeps.expand(base, sweeps.parse_axes(["activation=topk,batchtopk"])))
    assert [load_sae(out)[1]["sae"]["activation"] for out in outs] == ["topk", "batchtopk"]
