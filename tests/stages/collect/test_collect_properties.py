"""Property-based test (hypothesis) of collect: the row -> (context, position) mapping of collected stores
holds each stored position once, and each row is the model's activation there. Examples are derandomized,
so CI sees the same ones on every run (the store contract's own properties: tests/store_schema/test_properties.py)."""

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stages import collect as collect_stage
from stages.collect.config import CollectConfig
from store_schema import schema
from store_schema.reader import open_store


# -- row -> (context, position) in collected stores ------------------------------------------------------
# no shrinking: each example is a whole collect, and a failure's example is printed as drawn
@settings(
    deadline=None,
    derandomize=True,
    max_examples=6,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate],
)
@given(
    context_size=st.integers(8, 40),
    drop_first=st.integers(0, 3),
    exclude_special=st.booleans(),
    shuffle_buffer_rows=st.integers(100, 900),
    chunk_rows=st.integers(32, 400),
    eval_fraction=st.sampled_from([0.0, 0.1, 0.3]),
    seed=st.integers(0, 1000),
    normalize=st.sampled_from(["center-scale", "token", "none"]),
)
def test_a_collected_store_holds_each_stored_position_once(
    context_size, drop_first, exclude_special, shuffle_buffer_rows, chunk_rows, eval_fraction, seed, normalize
):
    from stages.host_model.loading import load_host_model
    from stages.host_model.model import run_to_hooks

    hook = "blocks.1.hook_resid_post"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.zarr"
        collect_stage.run_collect(
            CollectConfig(
                out=str(out),
                model="tiny-random",
                hooks=(hook,),
                tokens=1500,
                context_size=context_size,
                drop_first=drop_first,
                exclude_special=exclude_special,
                shuffle_buffer_rows=shuffle_buffer_rows,
                chunk_rows=chunk_rows,
                eval_fraction=eval_fraction,
                seed=seed,
                normalize=normalize,
                warmup_rows=300,
                progress=False,
            )
        )
        store = open_store(out)
        tokens = store.tokens[:]
        expected = schema.stored_positions(tokens, drop_first, list(store.header.excluded_tokens))
        seen = np.zeros_like(expected, dtype=np.int64)
        outliers = 0
        for split in schema.SPLITS:
            contexts, positions = store.read_mapping(split)
            assert len(contexts) == store.n_rows(split)
            assert set(np.unique(contexts)) <= set(store.contexts(split))  # a row's context is of its split
            np.add.at(seen, (contexts, positions), 1)
            stats = store.running_stats(split, hook)  # None for a split without rows (eval fraction 0)
            outliers += stats.outlier_rows if stats else 0
        assert seen.max() <= 1  # no position twice
        assert not (seen.astype(bool) & ~expected).any()  # nothing that should not be stored
        assert int((expected & ~seen.astype(bool)).sum()) == outliers  # what is missing is the counted outliers
        # and each row is the model's activation at its recorded position
        model = load_host_model("tiny-random")
        contexts, positions = store.read_mapping("train")
        picks = np.random.default_rng(seed).choice(len(contexts), min(8, len(contexts)), replace=False)
        raw = run_to_hooks(model, torch.from_numpy(tokens[contexts[picks]].astype(np.int64)), [hook])[hook]
        at = raw[torch.arange(len(picks)), torch.from_numpy(positions[picks].astype(np.int64))].float()
        normalized = store.normalization(hook).apply(at)[0].numpy().astype(np.float16)
        stored = np.stack([store.read_rows("train", hook, int(i), int(i) + 1)[0] for i in picks])
        np.testing.assert_array_equal(stored, normalized)
