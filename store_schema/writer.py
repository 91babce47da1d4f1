"""Writing a store: create it atomically, append blocks of rows, commit, resume, finalize.

Commit protocol. Row arrays are preallocated to the planned size; a block's rows are written into them
first and become visible only when `commit` rewrites the root attributes with the new `rows_committed`
(one metadata document, written atomically by Zarr's local store: temp file + rename). A writer killed
at any point leaves either the old or the new attributes, never a mix, so readers see whole blocks only
and a resume restarts exactly at the first uncommitted block. Rows past `rows_committed` may hold
bytes of an interrupted block (or of later blocks, written ahead by dask workers); the resume
overwrites them with the same values.

Durability. On a local filesystem (unless `durable=False`: scratch stores) a commit first flushes the
chunk files it makes visible and their folders, then writes the root metadata durably (store_schema.
durable): a power cut loses at most the commit in flight.

Several processes may write rows at once (collect across dask workers) as long as no two write into
one chunk at the same time: writing part of a chunk reads the chunk, changes it and writes it back.
Only the process holding the store lock commits.

Appends. `begin_append` grows the arrays of a complete store and records the append in the `append`
attribute; its blocks then commit into that attribute, not into the store's own progress, so readers
keep seeing the store as it was. `finalize` makes the appended rows the store's in one attribute write.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype

from store_schema import schema
from store_schema.chunk_files import ChunkFileWriter
from store_schema.durable import chunk_files, fsync_files, fsync_path, fsync_tree, local_root, write_durably
from store_schema.header import SplitProgress, StoreHeader, read_running_stats
from store_schema.normalization import Normalization


@dataclass
class WholeBlock:
    """A block being committed whole: its rows (which follow the previous block's), its own statistics and
    the contexts it left out (non-finite activations)."""

    index: int
    n_rows: int
    stats: dict[str, schema.RunningStats]
    dropped: list[int]


class StoreWriter:
    def __init__(self, group: zarr.Group, durable: bool = True):
        self.group = group
        # The root attribute as this writer keeps it up to date (progress, statistics, an append's state);
        # what others read of it is `header`, the typed view.
        self.attrs = dict(group.attrs[schema.ATTRS_KEY])
        # where to flush before each commit: the store's folder, or None (not asked, or not a local store)
        self.flush_root = local_root(group) if durable else None
        # called after every write of the root metadata (a collect straight to S3 mirrors the store then)
        self.after_commit: Callable[[StoreWriter], None] | None = None
        # writes the row arrays' chunk files (flushed as they are written when the commits are durable)
        self.chunk_files = ChunkFileWriter(durable=self.flush_root is not None)

    # -- creation -----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        header: dict,
        tokens: np.ndarray | Iterable[np.ndarray],
        context_split: np.ndarray,
        chunk_rows: int,
        durable: bool = True,
        shard_chunks: int = 1,
    ) -> StoreWriter:
        """Write the empty store (tokens, split, preallocated row arrays, attributes) to a temporary
        folder beside `path` and rename it into place, so a killed or failed creation leaves no half
        store. `tokens`: the contexts' token ids, an array or its pieces in order (each [n, context_size],
        best a multiple of TOKENS_CHUNK_CONTEXTS), written as they come so that a corpus of any size is
        never held in memory; the header gains their fingerprint and the rows each split will hold.
        `shard_chunks` > 1: the row arrays keep that many chunks to a file (a Zarr shard)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            group = zarr.open_group(store=str(tmp), mode="w")
            header = _header_with_layout(header, chunk_rows, shard_chunks)
            header["text_source"]["tokens_fingerprint"], header["layout"]["planned_rows"] = _write_tokens(
                group, header, [tokens] if isinstance(tokens, np.ndarray) else tokens, context_split
            )
            _create_row_arrays(group, header)
            group.update_attributes({schema.ATTRS_KEY: header})
            if durable:
                fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
        return cls(zarr.open_group(store=str(path), mode="r+"), durable)

    @classmethod
    def open(cls, path: str | os.PathLike, durable: bool = True) -> StoreWriter:
        group = zarr.open_group(store=str(path), mode="r+")
        header = StoreHeader.from_attrs(dict(group.attrs.get(schema.ATTRS_KEY, {})))
        if header.schema_version < schema.FIRST_WRITABLE_VERSION:
            raise schema.StoreError(
                f"store {path} uses schema version {header.schema_version}, written by an earlier saepipe: it "
                f"reads as it is, but this saepipe writes version {schema.FIRST_WRITABLE_VERSION} or later and "
                f"cannot continue or grow it; finish it with the saepipe that started it, or collect it again"
            )
        return cls(group, durable)

    def remove_leftover_temporaries(self) -> None:
        """Zarr writes each file to a `.partial` temporary and renames it; a writer killed in between
        leaves the temporary behind. Only for the lock holder resuming, before anyone else writes:
        another writer's temporary is a file in flight."""
        for leftover in Path(self.group.store.root).rglob("*.partial"):
            leftover.unlink()

    # -- state --------------------------------------------------------------------------------------
    @property
    def header(self) -> StoreHeader:
        """The store's header as it stands (typed, checked; parsed anew from `attrs` at each call)."""
        return StoreHeader.from_attrs(self.attrs)

    @cached_property
    def _layout(self) -> StoreHeader:
        """The header as this writer found it: its hooks, their widths and the normalization mode, which
        never change while it writes, so every commit reads them without parsing the attributes again."""
        return self.header

    @property
    def appending(self) -> bool:
        return bool(self.attrs.get("append"))

    def _live(self) -> dict:
        """Where this writer's progress and statistics are kept: in the attributes themselves, or, during
        an append, in the `append` attribute (which readers do not look at)."""
        return self.attrs["append"] if self.appending else self.attrs

    def progress(self, split: str) -> SplitProgress:
        """Rows and blocks committed to the split (during an append, the append's)."""
        return SplitProgress.from_attrs(self._live()["progress"][split])

    def n_contexts(self) -> int:
        """Contexts of the store as readers see it (an append in progress adds more after them)."""
        return int(self.attrs["split"]["n_train_contexts"] + self.attrs["split"]["n_eval_contexts"])

    def chunk_rows(self, split: str) -> int:
        """Rows per chunk of the split's row arrays (fewer than the layout's when the split is smaller)."""
        return int(self.group[schema.row_context_path(split)].chunks[0])

    def running_stats(self, split: str, hook: str) -> schema.RunningStats:
        # from the live record (an append's own during an append), not `header`: read at every commit
        saved = self._live()["running_stats"][split].get(hook)
        d = self._layout.width(hook)
        return schema.RunningStats(d) if saved is None else read_running_stats(self.group, split, hook, saved, d)

    def normalizations(self) -> dict[str, Normalization] | None:
        return self.header.normalizations(self.group)

    # -- writing ------------------------------------------------------------------------------------
    def record_normalization(self, norms: dict[str, Normalization]) -> None:
        """Arrays first, then the attribute that makes them count (a kill in between just re-estimates)."""
        for hook, norm in norms.items():
            if norm.mean is not None:
                self.group.create_array(
                    schema.norm_mean_path(hook),
                    data=norm.mean.astype(np.float32),
                    compressors=schema.checksummed(ZstdCodec()),
                    overwrite=True,
                )
        self._update(
            flush=self._files_below("normalization"),
            normalization={hook: norm.to_attrs() for hook, norm in norms.items()},
        )

    def write_rows(
        self,
        split: str,
        start: int,
        acts: dict[str, np.ndarray | list[np.ndarray]],
        row_context: np.ndarray | list[np.ndarray],
        row_position: np.ndarray | list[np.ndarray],
        row_stats: dict[str, np.ndarray | list[np.ndarray]] | None = None,
    ) -> None:
        """Write one block's rows at [start, start + n); invisible until `commit`. Each array's rows may
        come as the arrays that follow one another (rows held back and a new block's): the raw-layout
        arrays write them as they are, the others (compressed by Zarr) joined."""
        row_context, row_position = _joined(row_context), _joined(row_position)
        stop = start + len(row_context)
        writes = [
            (schema.row_context_path(split), row_context.astype(np.int32)),
            (schema.row_position_path(split), row_position.astype(np.int16)),
        ]
        for hook, rows in acts.items():
            writes.append((schema.acts_path(split, hook), rows))
            if row_stats is not None:
                writes.append((schema.row_stats_path(split, hook), row_stats[hook]))
        arrays = [(self.group[name], data) for name, data in writes]
        # the raw-layout arrays (the rows: nearly all the bytes) straight to their files, many at once
        self.chunk_files.write([(arr, start, data) for arr, data in arrays if self.chunk_files.handles(arr)])
        with zarr.config.set(schema.EVERY_CHUNK_WRITTEN_CONFIG):  # a runtime setting: not saved with the array
            for arr, data in arrays:
                if not self.chunk_files.handles(arr):
                    arr[start:stop] = _joined(data)

    def commit(
        self,
        split: str,
        blocks_done: int,
        rows_committed: int,
        stats: dict[str, schema.RunningStats],
        skipped_contexts: list[int],
        rows_in_blocks: int | None = None,
    ) -> None:
        """Make the split's rows up to `rows_committed` visible, with the statistics of its `blocks_done`
        whole blocks (`rows_in_blocks` rows, when fewer: the rest is the head of the next block) and the
        contexts this commit leaves out (`skipped_contexts`: non-finite activations). The sums and the
        skipped contexts are written to their arrays first, where no committed attribute points yet."""
        progress = SplitProgress(rows_committed, blocks_done, rows_in_blocks)
        written = self._row_chunk_files(split, self.progress(split).rows_committed, rows_committed)
        live = self._live()
        progress_attrs = dict(live["progress"])
        progress_attrs[split] = progress.to_attrs()
        progress_attrs["skipped_count"], written_skipped = self._write_skipped(
            live["progress"]["skipped_count"], skipped_contexts
        )
        running = dict(live["running_stats"])
        running[split] = {}
        for hook, hook_stats in stats.items():
            slot = self._free_sum_slot(split, hook)
            with zarr.config.set(schema.EVERY_CHUNK_WRITTEN_CONFIG):
                self.group[schema.running_sum_path(split, hook)][slot] = hook_stats.total
            running[split][hook] = hook_stats.to_attrs(slot)
            written += self._chunk_files(schema.running_sum_path(split, hook), slot, slot + 1)
        written += written_skipped
        if self.appending:
            self._update(flush=written, append={**live, "progress": progress_attrs, "running_stats": running})
        else:
            self._update(flush=written, progress=progress_attrs, running_stats=running)

    def commit_block(
        self,
        split: str,
        block_index: int,
        n_rows: int,
        block_stats: dict[str, schema.RunningStats],
        dropped_contexts: list[int],
    ) -> None:
        """Commit the split's next block, whose `n_rows` rows follow those of the whole blocks committed
        so far: its statistics are merged into the running ones and its dropped (non-finite) contexts
        recorded."""
        self.commit_blocks(split, [WholeBlock(block_index, n_rows, block_stats, dropped_contexts)])

    def commit_blocks(self, split: str, blocks: list[WholeBlock], rows_committed: int | None = None) -> None:
        """Commit the split's next whole `blocks` (none, when the commit only adds the head of one) and
        make its rows visible up to `rows_committed` (default: the end of the last block); rows past the
        blocks' end are the head of the next block. Statistics are merged a block at a time, in order,
        which gives the same sums however the blocks fall into commits."""
        done = self.progress(split)
        stats = {hook: self.running_stats(split, hook) for hook in self.attrs["hooks"]}
        dropped, block_rows = [], done.block_rows
        for i, block in enumerate(blocks):
            if block.index != done.blocks_done + i:
                raise ValueError(
                    f"committing {split} block {block.index}, but {done.blocks_done + i} "
                    f"blocks are committed: blocks are committed in order"
                )
            for hook, block_stats in block.stats.items():
                stats[hook].merge(block_stats)
            dropped += block.dropped
            block_rows += block.n_rows
        rows = block_rows if rows_committed is None else rows_committed
        if rows < max(block_rows, done.rows_committed):
            raise ValueError(
                f"committing {split} rows to {rows:,}, fewer than the {block_rows:,} of its whole blocks or "
                f"the {done.rows_committed:,} committed before"
            )
        self.commit(split, done.blocks_done + len(blocks), rows, stats, dropped, block_rows)

    def _free_sum_slot(self, split: str, hook: str) -> int:
        """A slot of the hook's running sums that neither the store's attributes nor a running append's
        name: writing it changes nothing any reader or resume relies on."""
        named = {
            attrs["running_stats"][split][hook]["sum_slot"]
            for attrs in (self.attrs, self.attrs.get("append") or {})
            if hook in attrs.get("running_stats", {}).get(split, {})
        }
        return min(set(range(schema.RUNNING_SUM_SLOTS)) - named)

    def _write_skipped(self, count: int, new: list[int]) -> tuple[int, list[Path]]:
        """Write contexts `new` after the first `count` skipped ones (past what any attribute counts);
        the new count, and the files to flush before it is committed."""
        if not new:
            return count, []
        arr = self.group[schema.SKIPPED_CONTEXTS]
        if arr.shape[0] < count + len(new):
            arr.resize((count + len(new),))
        with zarr.config.set(schema.EVERY_CHUNK_WRITTEN_CONFIG):
            arr[count : count + len(new)] = np.asarray(new, dtype=np.int64)
        return count + len(new), self._metadata_files([schema.SKIPPED_CONTEXTS]) + self._chunk_files(
            schema.SKIPPED_CONTEXTS, count, count + len(new)
        )

    def begin_append(
        self,
        token_budget: int,
        tokens: np.ndarray,
        context_split: np.ndarray,
        planned_rows: dict[str, int],
        tokens_fingerprint: str,
        writer: str,
    ) -> None:
        """Start appending contexts `tokens` (their split codes `context_split`, their stored positions
        per split `planned_rows`) to this complete store, towards `token_budget` training tokens; the
        fingerprint is of the tokens array with them. The arrays grow first (readers see only the
        contexts and rows the attributes count), then the `append` attribute records the append: a
        kill in between leaves the store as it was, and the next append grows the arrays again."""
        first, added = self.n_contexts(), len(tokens)
        rows = {split: self.progress(split).rows_committed + planned_rows[split] for split in schema.SPLITS}
        for split in schema.SPLITS:
            chunk = self.chunk_rows(split)
            if rows[split] > chunk and chunk != self.attrs["layout"]["chunk_rows"]:
                raise schema.StoreError(
                    f"the store keeps its {split} rows in one chunk of {chunk:,} rows (it was "
                    f"written before stores could grow), too small for {rows[split]:,} rows: "
                    f"collect a new store with the larger --tokens instead"
                )
        _write_from(self.group[schema.TOKENS], first, tokens.astype(np.int32))
        _write_from(self.group[schema.CONTEXT_SPLIT], first, context_split.astype(np.int8))
        for split in schema.SPLITS:
            for name in schema.row_array_names(self._layout, split):
                arr = self.group[name]
                arr.resize((rows[split],) + arr.shape[1:])
        counts = {
            f"n_{split}_contexts": int((context_split == code).sum()) for split, code in schema.SPLIT_CODES.items()
        }
        layout = self.attrs["layout"]["planned_rows"]
        grown = [schema.TOKENS, schema.CONTEXT_SPLIT] + [
            name for split in schema.SPLITS for name in schema.row_array_names(self._layout, split)
        ]
        self._update(
            flush=self._metadata_files(grown)
            + self._chunk_files(schema.TOKENS, first, first + added)
            + self._chunk_files(schema.CONTEXT_SPLIT, first, first + added),
            append={
                "tokens": token_budget,
                "contexts": [first, first + added],
                "split": counts,
                "planned_rows": {split: layout[split] + planned_rows[split] for split in schema.SPLITS},
                "tokens_fingerprint": tokens_fingerprint,
                "writer": writer,
                "progress": self.attrs["progress"],
                "running_stats": self.attrs["running_stats"],
            },
        )

    def finalize(self) -> None:
        """Trim row arrays to what was written (contexts may have been skipped) and mark complete; after
        an append, make its rows, statistics and contexts the store's, in one attribute write."""
        resized = []
        for split in schema.SPLITS:
            n = self.progress(split).rows_committed
            for name in schema.row_array_names(self._layout, split):
                arr = self.group[name]
                if arr.shape[0] != n:
                    arr.resize((n,) + arr.shape[1:])
                    resized.append(name)
        if not self.appending:
            self._update(flush=self._metadata_files(resized), complete=True)
            return
        self.attrs = self.header.with_append_merged().to_attrs()
        self._write_attributes(flush=self._metadata_files(resized))

    def _update(self, flush: list[Path] = (), **changes) -> None:
        self.attrs.update(changes)
        self._write_attributes(flush)

    def _write_attributes(self, flush: list[Path] = ()) -> None:
        """Write the root metadata, the commit readers see; a durable writer first flushes `flush` (the
        files the new metadata points to) and writes it durably."""
        if self.flush_root is None:
            self.group.update_attributes({schema.ATTRS_KEY: self.attrs})
        else:
            fsync_files(flush)
            metadata = self.group.metadata  # the bytes Zarr's update_attributes would write, written durably
            metadata.attributes[schema.ATTRS_KEY] = self.attrs
            write_durably(
                self.flush_root / "zarr.json",
                metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes(),
            )
        if self.after_commit is not None:
            self.after_commit(self)

    # -- what a durable commit flushes first (nothing when this writer does not flush) ----------------
    def _row_chunk_files(self, split: str, first_row: int, stop_row: int) -> list[Path]:
        """The chunk files of the split's row arrays holding rows [first_row, stop_row)."""
        return [
            path
            for name in schema.row_array_names(self._layout, split)
            for path in self._chunk_files(name, first_row, stop_row)
        ]

    def _chunk_files(self, name: str, first_row: int, stop_row: int) -> list[Path]:
        if self.flush_root is None:
            return []
        return chunk_files(self.flush_root, self.group[name], first_row, stop_row)

    def _metadata_files(self, names: list[str]) -> list[Path]:
        if self.flush_root is None:
            return []
        return [self.flush_root / name / "zarr.json" for name in names]

    def _files_below(self, name: str) -> list[Path]:
        if self.flush_root is None:
            return []
        return [path for path in (self.flush_root / name).rglob("*") if path.is_file()]


def _header_with_layout(header: dict, chunk_rows: int, shard_chunks: int) -> dict:
    """A new store's header: `header` with its layout and empty progress (nothing committed yet)."""
    header = {**header, "text_source": dict(header["text_source"])}
    header["layout"] = {"chunk_rows": chunk_rows, "planned_rows": None}
    if shard_chunks > 1:
        header["layout"]["shard_rows"] = chunk_rows * shard_chunks
        header["schema_version"] = max(header["schema_version"], schema.FIRST_SHARDED_VERSION)
    header["progress"] = {split: SplitProgress(0, 0).to_attrs() for split in schema.SPLITS}
    header["progress"]["skipped_count"] = 0
    header["running_stats"] = {split: {} for split in schema.SPLITS}
    header["normalization"] = None
    header["complete"] = False
    return header


def _write_tokens(
    group: zarr.Group, header: dict, pieces: Iterable[np.ndarray], context_split: np.ndarray
) -> tuple[str, dict[str, int]]:
    """Write the tokens piece by piece (and the split); returns their fingerprint and each split's
    stored positions (the rows it will hold at most, before the outlier filter)."""
    n_contexts, context_size = len(context_split), header["context_size"]
    drop_first, excluded = len(header["dropped_positions"]), header["excluded_tokens"]
    with zarr.config.set(schema.EVERY_CHUNK_WRITTEN_CONFIG):  # an all-zero chunk too: verify expects it
        tokens = group.create_array(
            schema.TOKENS,
            shape=(n_contexts, context_size),
            dtype="int32",
            fill_value=0,
            compressors=schema.checksummed(ZstdCodec()),
            chunks=(min(schema.TOKENS_CHUNK_CONTEXTS, max(n_contexts, 1)), context_size),
        )
        group.create_array(
            schema.CONTEXT_SPLIT,
            data=context_split.astype(np.int8),
            compressors=schema.checksummed(ZstdCodec()),
            chunks=(max(n_contexts, 1),),
        )
        fingerprint, stored, done = schema.TokensFingerprint(), np.zeros(n_contexts, np.int64), 0
        for piece in pieces:
            piece = np.ascontiguousarray(piece, dtype=np.int32)
            if done + len(piece) > n_contexts or piece.shape[1:] != (context_size,):
                raise ValueError(f"token pieces overrun the {n_contexts} contexts of {context_size} tokens")
            tokens[done : done + len(piece)] = piece
            fingerprint.update(piece)
            stored[done : done + len(piece)] = schema.stored_positions(piece, drop_first, excluded).sum(axis=1)
            done += len(piece)
    if done != n_contexts:
        raise ValueError(f"token pieces hold {done} contexts, not the {n_contexts} of the split")
    planned = {split: int(stored[context_split == code].sum()) for split, code in schema.SPLIT_CODES.items()}
    return fingerprint.hexdigest(), planned


def _width(attrs: dict, hook: str) -> int:
    """A hook's row width in a header being built (before it can be read as a StoreHeader)."""
    return int((attrs.get("hook_widths") or {}).get(hook, attrs["d_model"]))


def _create_row_arrays(group: zarr.Group, header: dict) -> None:
    """The preallocated row arrays of both splits, the running sums' slots and the skipped contexts."""
    chunk_rows, planned_rows = header["layout"]["chunk_rows"], header["layout"]["planned_rows"]
    shard_rows = header["layout"].get("shard_rows")
    row_stats = header["normalization_mode"] == "token"

    def shards(width: int | None) -> tuple[int, ...] | None:
        """Zarr's `shards` for a row array of rows `width` wide (None: a 1-D array), or None unsharded."""
        return None if shard_rows is None else (shard_rows,) + (() if width is None else (width,))

    for split in schema.SPLITS:
        n = planned_rows[split]
        chunk = (chunk_rows,)  # also for a smaller split: its arrays can then grow (--append)
        for name, dtype in ((schema.row_context_path(split), "int32"), (schema.row_position_path(split), "int16")):
            group.create_array(
                name,
                shape=(n,),
                dtype=dtype,
                chunks=chunk,
                shards=shards(None),
                fill_value=-1,
                compressors=schema.checksummed(ZstdCodec()),
            )
        for hook in header["hooks"]:
            # fp16 activations barely compress; raw chunks (plus their checksum) read fastest.
            width = _width(header, hook)
            group.create_array(
                schema.acts_path(split, hook),
                shape=(n, width),
                dtype="float16",
                chunks=chunk + (width,),
                shards=shards(width),
                compressors=schema.checksummed(),
                fill_value=0,
            )
            if row_stats:
                group.create_array(
                    schema.row_stats_path(split, hook),
                    shape=(n, 2),
                    dtype="float32",
                    chunks=chunk + (2,),
                    shards=shards(2),
                    compressors=schema.checksummed(),
                    fill_value=0,
                )
    with zarr.config.set(schema.EVERY_CHUNK_WRITTEN_CONFIG):  # zeros too: a missing chunk is damage
        for split in schema.SPLITS:
            for hook in header["hooks"]:
                width = _width(header, hook)
                group.create_array(
                    schema.running_sum_path(split, hook),
                    data=np.zeros((schema.RUNNING_SUM_SLOTS, width)),
                    chunks=(1, width),
                    compressors=schema.checksummed(),
                )
    group.create_array(
        schema.SKIPPED_CONTEXTS,
        shape=(0,),
        dtype="int64",
        chunks=(schema.SKIPPED_CHUNK,),
        compressors=schema.checksummed(ZstdCodec()),
    )


def _joined(rows: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Rows given as one array, or as the arrays that follow one another, as one array."""
    return np.concatenate(rows) if isinstance(rows, (list, tuple)) else rows


def _write_from(arr: zarr.Array, first: int, data: np.ndarray) -> None:
    """Make `arr` end with `data` at index `first` (growing or shrinking it)."""
    arr.resize((first + len(data),) + arr.shape[1:])
    with zarr.config.set(schema.EVERY_CHUNK_WRITTEN_CONFIG):
        arr[first:] = data
