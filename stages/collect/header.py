"""A new store: the text packed into contexts, their split, and the header that records every setting."""

from __future__ import annotations

from stages import __version__
from stages.collect.blocks import contexts_per_block
from stages.collect.config import CollectConfig
from stages.text.packing import iter_packed_contexts
from stages.text.sources import open_text_source
from store_schema import schema
from store_schema.writer import StoreWriter


def create_store(cfg: CollectConfig, model, hooks: list[str]) -> StoreWriter:
    source = open_text_source(cfg.dataset, split=cfg.dataset_split, text_column=cfg.text_column)
    tok = model.tokenizer
    separator = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    n_contexts = schema.contexts_needed(cfg.tokens, cfg.rows_per_context, cfg.eval_fraction)
    tokens = iter_packed_contexts(  # pieces written as they are packed: never the whole corpus in memory
        source.documents(),
        tok.encode,
        context_size=cfg.context_size,
        n_contexts=n_contexts,
        bos_token_id=tok.bos_token_id,
        separator_token_id=separator,
        piece_contexts=schema.TOKENS_CHUNK_CONTEXTS,
        progress=cfg.progress,
    )
    context_split = schema.assign_split(n_contexts, cfg.eval_fraction, cfg.seed)
    n_train, n_eval = schema.split_counts(n_contexts, cfg.eval_fraction)
    content = cfg.content_fields()
    header = schema.new_header(
        writer=f"saepipe {__version__}",
        config_fingerprint=schema.fingerprint(content),
        collect_config=content,
        model={
            "name": cfg.model,
            "revision": model.revision,
            "d_model": model.d_model,
            "n_layers": model.n_layers,
            "dtype": cfg.dtype,
            "forward": model.forward_path(hooks),
        },
        text_source=source.describe(),  # the writer adds the tokens' fingerprint
        tokenizer={
            "name": tok.name,
            "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_token_id,
            "separator_token_id": separator,
            "bos_at_position_0": True,
        },
        context_size=cfg.context_size,
        dropped_positions=list(range(cfg.drop_first)),
        excluded_tokens=sorted({tok.bos_token_id, separator}) if cfg.exclude_special else [],
        outlier_factor=cfg.outlier_factor,
        hooks=hooks,
        d_model=model.d_model,
        token_budget=cfg.tokens,
        shuffle={
            "seed": cfg.seed,
            "buffer_rows": cfg.shuffle_buffer_rows,
            "contexts_per_block": contexts_per_block(cfg),
        },
        split={"eval_fraction": cfg.eval_fraction, "n_train_contexts": n_train, "n_eval_contexts": n_eval},
        normalization_mode=cfg.normalize,
        warmup_rows=cfg.warmup_rows,
        nonfinite_policy=cfg.nonfinite,
        hook_widths={hook: model.hook_width(hook) for hook in hooks},
    )
    return StoreWriter.create(cfg.out, header, tokens, context_split, cfg.chunk_rows, cfg.fsync, cfg.shard_chunks)
