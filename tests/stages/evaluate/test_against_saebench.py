"""Our k-sparse probing and absorption against SAEBench 0.6.0's own code, on the same inputs. SAEBench
cannot be installed beside saepipe (it pins numpy < 2 and datasets < 4), so its side runs in an environment
of its own (benchmarks/saebench_check.py): `make saebench` builds it and runs this file with
SAEPIPE_SAEBENCH_PYTHON set. Without it these tests are skipped (CI)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.evaluate.absorption import absorption_fraction, full_absorption
from stages.evaluate.probing import fit_logistic_regression, top_k_by_mean_difference

SAEBENCH_PYTHON = os.environ.get("SAEPIPE_SAEBENCH_PYTHON")
pytestmark = pytest.mark.skipif(
    not SAEBENCH_PYTHON,
    reason="needs a Python with sae-bench 0.6.0 (`make saebench` builds one and sets SAEPIPE_SAEBENCH_PYTHON)",
)
SCRIPT = Path(__file__).parents[3] / "pipeline" / "tools" / "saebench_check.py"
KS = (1, 2, 5)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The inputs, and what SAEBench computed from them."""
    rng = np.random.default_rng(0)
    # probing: 300 mean-pooled "texts" of 40 features, the class carried by a few of them
    y = rng.random(300) < 0.5
    x = rng.exponential(0.3, size=(300, 40)).astype(np.float32)
    x[:, [4, 17, 22]] += (y[:, None] * rng.random((300, 3)) * [1.0, 0.6, 0.3]).astype(np.float32)
    # absorption: 12 latents in 32 dimensions, sparse non-negative codes of 200 words
    d, d_sae = 32, 12
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    w_dec = rng.normal(size=(d_sae, d))
    w_dec[:6] += rng.uniform(0.5, 3.0, size=(6, 1)) * direction  # latents leaning towards the probe
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    codes = rng.exponential(1.0, size=(200, d_sae)) * (rng.random((200, d_sae)) < 0.25)
    codes[::3, 0] = 0  # the main latent off on a third of the words
    codes[:, -1] += 0.01  # every word has some activation (SAEBench divides by a zero projection)
    inputs = dict(
        probe_x_train=x[:200], probe_y_train=y[:200].astype(np.int64), probe_x_test=x[200:],
        probe_y_test=y[200:].astype(np.int64), probe_ks=np.array(KS), W_dec=w_dec.astype(np.float32),
        direction=direction.astype(np.float32), main=np.array([0, 1]), codes=codes.astype(np.float32),
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("saebench")
    np.savez(folder / "inputs.npz", **inputs)
    done = subprocess.run(
        [SAEBENCH_PYTHON, str(SCRIPT), str(folder / "inputs.npz"), str(folder / "out.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return inputs, json.loads((folder / "out.json").read_text())


def test_k_sparse_probing_agrees(compared):
    inputs, theirs = compared
    x_train, x_test = torch.from_numpy(inputs["probe_x_train"]), torch.from_numpy(inputs["probe_x_test"])
    y_train, y_test = torch.from_numpy(inputs["probe_y_train"]).bool(), torch.from_numpy(inputs["probe_y_test"]).bool()
    for k in KS:
        chosen = top_k_by_mean_difference(x_train, y_train, k)
        predict = fit_logistic_regression(x_train[:, chosen], y_train)
        ours = float((predict(x_test[:, chosen]) == y_test).float().mean())
        assert ours == pytest.approx(theirs["probing"][str(k)], abs=1 / len(y_test) + 1e-9), k


def test_absorption_agrees_word_by_word(compared):
    inputs, theirs = compared
    w_dec, direction = torch.from_numpy(inputs["W_dec"]), torch.from_numpy(inputs["direction"])
    cos = torch.nn.functional.cosine_similarity(w_dec, direction[None, :], dim=1)
    main = inputs["main"].tolist()
    fractions, fulls = [], []
    for planted, word in zip(torch.from_numpy(inputs["codes"]), theirs["absorption"]):
        acts = torch.tensor(word["codes"])  # the codes SAEBench's SAE encoded, rounding included
        assert torch.allclose(acts, planted, atol=1e-4)
        act_proj = float((planted @ w_dec) @ direction)
        fractions.append(absorption_fraction(acts * cos, cos, main, act_proj))
        fulls.append(full_absorption(acts, acts * cos, cos, main, act_proj))
    theirs_fraction = [w["absorption_fraction"] for w in theirs["absorption"]]
    np.testing.assert_allclose(fractions, theirs_fraction, atol=1e-4)
    assert fulls == [w["full_absorption"] for w in theirs["absorption"]]
    assert 0 < np.mean(fractions) < 1 and any(fulls)  # the cases exercise the rules, not only zeros
