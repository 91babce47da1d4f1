"""The collect settings the collect tests share: the tiny random model at two hooks, in small blocks and
chunks."""

HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")
# Blocks of about 20 contexts (<= 620 rows), 256-row chunks, 4 chunks to a shard: block boundaries fall
# inside chunks and shards, so commits (on shard boundaries) fall inside blocks. No token budget: add
# `tokens` (or `append`).
SETTINGS = dict(
    model="tiny-random",
    hooks=HOOKS,
    context_size=32,
    eval_fraction=0.1,
    batch_size=8,
    shuffle_buffer_rows=620,
    chunk_rows=256,
    shard_chunks=4,
    warmup_rows=500,
    progress=False,
)
# 6,000 tokens: about ten training blocks and an eval split of two blocks.
SMALL = dict(SETTINGS, tokens=6000)


def cli_args(*hooks: str, tokens: int) -> list[str]:
    """The `saepipe collect` arguments of SETTINGS (tiny-random, small blocks and chunks) for these hooks."""
    args = ["--model", "tiny-random"]
    for hook in hooks:
        args += ["--hook", hook]
    return args + [
        "--tokens", str(tokens), "--context-size", "32", "--batch-size", "8", "--shuffle-buffer-rows", "620",
        "--chunk-rows", "256", "--shard-chunks", "4", "--warmup-rows", "500", "--eval-fraction", "0.1", "--no-progress",
    ]  # fmt: skip
