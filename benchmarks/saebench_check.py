"""SAEBench 0.6.0's own code on inputs saepipe's tests write, so our absorption and k-sparse probing can be
compared with it. Run with the Python of an environment that has sae-bench (it cannot live beside
saepipe: it pins numpy < 2 and datasets < 4); `make saebench` builds one and runs the comparison test.
Standalone on purpose: it imports neither saepipe nor zarr.

    python benchmarks/saebench_check.py INPUTS.npz OUTPUT.json

INPUTS.npz holds:
- probing: `probe_x_train`, `probe_y_train`, `probe_x_test`, `probe_y_test` (mean-pooled features, binary
  labels) and `probe_ks`: SAEBench's `get_top_k_mean_diff_mask` and `train_sklearn_probe` give the test
  accuracy for each k;
- absorption: `W_dec` [d_sae, d], `direction` [d] (the probe's), `main` (main latent ids) and `codes`
  [n, d_sae] (non-negative): a SAELens StandardSAE with that decoder and an exact encoder (its
  pseudo-inverse, d_sae <= d) encodes each word's activation x = codes @ W_dec back to its codes, and
  SAEBench's `FeatureAbsorptionCalculator` gives each word's absorption fraction and full absorption.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# SAEBench's train_probe_on_activations trips its own shape annotations (jaxtyping/beartype); its pieces,
# called here one by one, are fine either way
os.environ.setdefault("JAXTYPING_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT_SUFFIX = " has the first letter:"


def probing_accuracies(inputs) -> dict[str, float]:
    import sae_bench.evals.sparse_probing.probe_training as probes

    x_train, y_train = torch.from_numpy(inputs["probe_x_train"]), torch.from_numpy(inputs["probe_y_train"])
    x_test, y_test = torch.from_numpy(inputs["probe_x_test"]), torch.from_numpy(inputs["probe_y_test"])
    out = {}
    for k in inputs["probe_ks"].tolist():
        dropped = probes.get_top_k_mean_diff_mask(x_train, y_train, k)  # True: the dimensions left out
        train = probes.apply_topk_mask_reduce_dim(x_train, dropped)
        test = probes.apply_topk_mask_reduce_dim(x_test, dropped)
        _, accuracy = probes.train_sklearn_probe(train, y_train, test, y_test, max_iter=1000, C=1.0)
        out[str(k)] = float(accuracy)
    return out


def absorption_per_word(inputs) -> list[dict]:
    from sae_bench.evals.absorption.feature_absorption import (
        ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
        ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        FULL_ABSORPTION_PROBE_COS_THRESHOLD,
    )
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    W_dec = torch.from_numpy(inputs["W_dec"]).float()  # noqa: N806
    codes = torch.from_numpy(inputs["codes"]).float()
    d_sae, d = W_dec.shape
    hook = "blocks.0.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(torch.linalg.pinv(W_dec))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    words = [f" w{i}x" for i in range(len(codes))]
    activation = {word: row @ W_dec for word, row in zip(words, codes)}

    class WordModel:
        """What the calculator asks of a model: each prompt's activation at its word, position −6."""

        def run_with_cache(self, prompts, names_filter):
            acts = torch.zeros(len(prompts), 6, d)
            for i, text in enumerate(prompts):
                acts[i, 0] = activation[text.split("\n")[-1].removesuffix(PROMPT_SUFFIX)]
            return None, {names_filter[0]: acts}

        def to_tokens(self, text):
            return torch.zeros(1, 10, dtype=torch.long)  # every prompt the same length

    calculator = FeatureAbsorptionCalculator(
        model=WordModel(),  # type: ignore[arg-type]
        icl_word_list=words,
        max_icl_examples=10,
        base_template="{word}" + PROMPT_SUFFIX,
        word_token_pos=-6,
        full_absorption_probe_cos_sim_threshold=FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        absorption_fraction_probe_cos_sim_threshold=ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        probe_projection_proportion_threshold=ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        absorption_fraction_max_absorbing_latents=ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
    )
    calculator.topk_feats = min(calculator.topk_feats, d_sae)
    result = calculator.calculate_absorption(
        sae, words=words, probe_direction=torch.from_numpy(inputs["direction"]).float(),
        main_feature_ids=inputs["main"].tolist(), layer=0, show_progress=False,
    )  # fmt: skip
    with torch.no_grad():  # the codes SAEBench saw: ours are computed from the same (encoding rounds)
        seen = sae.encode(torch.stack([activation[word] for word in words]))
    return [
        {
            "absorption_fraction": float(r.absorption_fraction),
            "full_absorption": bool(r.is_full_absorption),
            "codes": row.tolist(),
        }
        for r, row in zip(result.word_results, seen)
    ]


def main() -> None:
    inputs = np.load(sys.argv[1])
    with open(sys.argv[2], "w") as out:
        json.dump({"probing": probing_accuracies(inputs), "absorption": absorption_per_word(inputs)}, out)


if __name__ == "__main__":
    main()
