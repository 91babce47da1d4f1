"""The store's header, typed: what a store's root attribute `saepipe` records (SPEC.md), read and checked
once, in one place.

`StoreHeader.from_attrs` validates the attributes of any schema version this code reads (1, 2 or 3) and
raises the damaged-store error (`schema.damaged`) when they are not a store's; code outside store_schema reads
typed fields instead of indexing the attribute dict. `to_attrs` gives the attributes back exactly as they
were read, so a writer that rewrites them changes no byte it did not mean to.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from store_schema.schema import (
    FIRST_SMALL_METADATA_VERSION,
    RUNNING_SUM_SLOTS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    SPLITS,
    RunningStats,
    StoreError,
    damaged,
    fingerprint,
    norm_mean_path,
    running_sum_path,
)

if TYPE_CHECKING:  # normalization imports torch, this module does not
    import zarr

    from store_schema.normalization import Normalization

# Hook names become paths inside the store (train/acts/<hook>): from a store of unknown origin, only names
# that cannot reach outside it, and not so many that listing them is a denial of service.
SAFE_HOOK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
MAX_HOOKS = 4096


class _Problem(Exception):
    """What is wrong with the attributes, found while parsing them."""


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value, what: str, minimum: int = 0) -> int:
    if not _is_int(value, minimum):
        raise _Problem(f"'{what}' is not {'a positive integer' if minimum else 'a count'}")
    return value


def _object(value, what: str) -> Mapping:
    if not isinstance(value, dict):
        raise _Problem(f"'{what}' is not an object")
    return MappingProxyType(value)


def _ints(value, what: str) -> tuple[int, ...]:
    if not (isinstance(value, list) and all(_is_int(v) for v in value)):
        raise _Problem(f"'{what}' is not a list of integers")
    return tuple(value)


@dataclass(frozen=True)
class ModelRecord:
    """The host model the rows came from."""

    name: str
    revision: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    dtype: str = "float32"
    forward: str | None = None  # hf-sdpa, transformer-bridge or synthetic (stores written since it was added)

    @classmethod
    def parse(cls, obj: Mapping) -> ModelRecord:
        if not isinstance(obj.get("name", ""), str):
            raise _Problem("'model.name' is not a string")
        known = {key: obj[key] for key in ("revision", "d_model", "n_layers", "dtype", "forward") if key in obj}
        return cls(name=obj.get("name", ""), **known)


@dataclass(frozen=True)
class TokenizerRecord:
    """How the text was tokenized, and its special tokens."""

    name: str | None = None
    vocab_size: int | None = None
    bos_token_id: int | None = None
    separator_token_id: int | None = None
    bos_at_position_0: bool = False

    @classmethod
    def parse(cls, obj: Mapping) -> TokenizerRecord:
        keys = ("name", "vocab_size", "bos_token_id", "separator_token_id", "bos_at_position_0")
        return cls(**{key: obj[key] for key in keys if key in obj})


@dataclass(frozen=True)
class ContextSplit:
    """How many contexts each split holds (an append's pending contexts are not counted until committed)."""

    eval_fraction: float | None = None
    n_train_contexts: int | None = None  # None: not recorded (a store written from given rows)
    n_eval_contexts: int | None = None

    @property
    def n_contexts(self) -> int:
        return (self.n_train_contexts or 0) + (self.n_eval_contexts or 0)

    @classmethod
    def parse(cls, obj: Mapping) -> ContextSplit:
        counts = {key: _int(obj[key], f"split.{key}") for key in ("n_train_contexts", "n_eval_contexts") if key in obj}
        return cls(eval_fraction=obj.get("eval_fraction"), **counts)


@dataclass(frozen=True)
class SplitProgress:
    """Rows committed to one split, and the whole blocks they hold. A sharded store commits on shard
    boundaries, so the rows committed can run into the next block: `rows_in_blocks` (when given) are
    the rows of the `blocks_done` whole blocks, whose statistics and skipped contexts are committed;
    the rows after them are the committed head of block `blocks_done`, written again by nobody."""

    rows_committed: int
    blocks_done: int
    rows_in_blocks: int | None = None  # None: every committed row is in a whole block

    @property
    def block_rows(self) -> int:
        """Rows of the whole blocks committed: where the next block's rows start."""
        return self.rows_committed if self.rows_in_blocks is None else self.rows_in_blocks

    @classmethod
    def from_attrs(cls, obj: Mapping) -> SplitProgress:
        return cls(obj["rows_committed"], obj["blocks_done"], obj.get("rows_in_blocks"))

    def to_attrs(self) -> dict:
        # blocks_done first: the key order stores have always been written with (their bytes)
        attrs = {"blocks_done": self.blocks_done, "rows_committed": self.rows_committed}
        if self.block_rows != self.rows_committed:
            attrs["rows_in_blocks"] = self.block_rows
        return attrs


@dataclass(frozen=True)
class Append:
    """One `--append` that grew the store (or, as `StoreHeader.pending_append`, one under way)."""

    tokens: int
    contexts: tuple[int, int]  # [first, stop) into `tokens`
    writer: str = ""

    @classmethod
    def parse(cls, obj, what: str) -> Append:
        if not (isinstance(obj, dict) and isinstance(obj.get("contexts"), list) and len(obj["contexts"]) == 2):
            raise _Problem(f"'{what}' does not give the appended contexts")
        first, stop = obj["contexts"]
        return cls(_int(obj.get("tokens"), f"{what}.tokens"), (first, stop), obj.get("writer", ""))

    def to_attrs(self) -> dict:
        """Its entry in `appends`."""
        return {"tokens": self.tokens, "contexts": list(self.contexts), "writer": self.writer}


@dataclass(frozen=True)
class StoreHeader:
    """Every field SPEC.md describes, typed. Free-form records (the collect configuration, the text
    source's description, the shuffle's settings) stay read-only mappings."""

    schema_version: int
    writer: str
    config_fingerprint: str
    collect_config: Mapping
    model: ModelRecord
    text_source: Mapping
    tokenizer: TokenizerRecord
    context_size: int
    dropped_positions: tuple[int, ...]
    excluded_tokens: tuple[int, ...]
    outlier_factor: float | None
    hooks: tuple[str, ...]
    d_model: int
    hook_widths: Mapping[str, int]
    token_budget: int
    shuffle: Mapping
    split: ContextSplit
    normalization_mode: str
    warmup_rows: int
    nonfinite_policy: str
    chunk_rows: int
    shard_rows: int | None  # rows per shard file of the row arrays; None: a file per chunk
    planned_rows: Mapping[str, int]
    progress: Mapping[str, SplitProgress]
    complete: bool
    appends: tuple[Append, ...]
    pending_append: Append | None
    _attrs: dict = field(repr=False, compare=False)

    # -- reading ------------------------------------------------------------------------------------
    @classmethod
    def from_attrs(cls, attrs) -> StoreHeader:
        """The header of the root attribute `saepipe`; a StoreError (`damaged`) unless it is a store this
        code reads."""
        if not isinstance(attrs, dict) or attrs.get("schema") != SCHEMA_NAME:
            raise StoreError("not a saepipe activation store (its attributes carry no saepipe schema)")
        version = attrs.get("schema_version")
        if not _is_int(version, 1):
            raise StoreError(f"store has an invalid schema version {version!r}")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store uses schema version {version}, newer than this saepipe reads ({SCHEMA_VERSION}): "
                f"upgrade saepipe (pip install -U saepipe)"
            )
        for key in ("hooks", "d_model", "context_size", "progress", "layout", "complete"):
            if key not in attrs:
                raise StoreError(f"store attributes lack '{key}': the store is damaged or was not written by saepipe")
        try:
            return cls._parse(attrs, version)
        except _Problem as problem:
            raise damaged(f"its attributes are malformed ({problem})") from None

    @classmethod
    def _parse(cls, attrs: dict, version: int) -> StoreHeader:
        hooks = attrs["hooks"]
        if not (isinstance(hooks, list) and hooks and all(isinstance(h, str) and h for h in hooks)):
            raise _Problem("'hooks' is not a list of hook names")
        if len(hooks) > MAX_HOOKS:
            raise _Problem(f"it names {len(hooks):,} hooks, more than the {MAX_HOOKS:,} a store may hold")
        for hook in hooks:  # hook names become paths in the store: none may lead outside it
            if not SAFE_HOOK_NAME.fullmatch(hook) or ".." in hook:
                raise _Problem(
                    f"hook name {hook[:60]!r} is not a safe name (letters, digits, '_', '.', '-', at most 200)"
                )
        d_model = _int(attrs["d_model"], "d_model", 1)
        context_size = _int(attrs["context_size"], "context_size", 1)
        widths = attrs.get("hook_widths", {})
        if not (isinstance(widths, dict) and all(h in hooks and _is_int(w, 1) for h, w in widths.items())):
            raise _Problem("'hook_widths' is not a positive width for hooks of the store")
        if not isinstance(attrs["complete"], bool):
            raise _Problem("'complete' is not true or false")
        if not isinstance(attrs.get("config_fingerprint"), str):
            raise _Problem("'config_fingerprint' is missing or not a string")
        layout = attrs["layout"]
        if not (isinstance(layout, dict) and _is_int(layout.get("chunk_rows"), 1)):
            raise _Problem("'layout.chunk_rows' is not a positive integer")
        shard_rows = layout.get("shard_rows")
        if shard_rows is not None and not (_is_int(shard_rows, 1) and shard_rows % layout["chunk_rows"] == 0):
            raise _Problem("'layout.shard_rows' is not a positive multiple of 'layout.chunk_rows'")
        planned = layout.get("planned_rows")
        if not (isinstance(planned, dict) and all(_is_int(planned.get(s)) for s in SPLITS)):
            raise _Problem("'layout.planned_rows' does not give a row count per split")
        progress = cls._progress(attrs["progress"], version)
        cls._check_running_stats(_object(attrs.get("running_stats", {}), "running_stats"), version)
        cls._check_normalization(attrs.get("normalization"))
        return cls(
            schema_version=version,
            writer=str(attrs.get("writer", "")),
            config_fingerprint=attrs["config_fingerprint"],
            collect_config=_object(attrs.get("collect_config", {}), "collect_config"),
            model=ModelRecord.parse(_object(attrs.get("model", {}), "model")),
            text_source=_object(attrs.get("text_source", {}), "text_source"),
            tokenizer=TokenizerRecord.parse(_object(attrs.get("tokenizer", {}), "tokenizer")),
            context_size=context_size,
            dropped_positions=_ints(attrs.get("dropped_positions", []), "dropped_positions"),
            excluded_tokens=_ints(attrs.get("excluded_tokens", []), "excluded_tokens"),
            outlier_factor=attrs.get("outlier_factor"),
            hooks=tuple(hooks),
            d_model=d_model,
            hook_widths=MappingProxyType({h: widths.get(h, d_model) for h in hooks}),
            token_budget=attrs.get("token_budget", 0),
            shuffle=_object(attrs.get("shuffle", {}), "shuffle"),
            split=ContextSplit.parse(_object(attrs.get("split", {}), "split")),
            normalization_mode=attrs.get("normalization_mode", "none"),
            warmup_rows=attrs.get("warmup_rows", 0),
            nonfinite_policy=attrs.get("nonfinite_policy", "skip"),
            chunk_rows=layout["chunk_rows"],
            shard_rows=shard_rows,
            planned_rows=MappingProxyType({s: planned[s] for s in SPLITS}),
            progress=MappingProxyType(progress),
            complete=attrs["complete"],
            appends=tuple(Append.parse(a, f"appends[{i}]") for i, a in enumerate(attrs.get("appends", []))),
            pending_append=Append.parse(attrs["append"], "append") if attrs.get("append") else None,
            _attrs=copy.deepcopy(attrs),
        )

    @staticmethod
    def _progress(progress, version: int) -> dict[str, SplitProgress]:
        if not isinstance(progress, dict):
            raise _Problem("'progress' is not an object")
        parsed = {}
        for split in SPLITS:
            done = progress.get(split)
            if not (
                isinstance(done, dict) and _is_int(done.get("rows_committed")) and _is_int(done.get("blocks_done"))
            ):
                raise _Problem(f"'progress.{split}' does not give rows_committed and blocks_done")
            if "rows_in_blocks" in done and not (
                _is_int(done["rows_in_blocks"]) and done["rows_in_blocks"] <= done["rows_committed"]
            ):
                raise _Problem(f"'progress.{split}.rows_in_blocks' is not a count of committed rows")
            parsed[split] = SplitProgress.from_attrs(done)
        if version >= FIRST_SMALL_METADATA_VERSION:
            _int(progress.get("skipped_count"), "progress.skipped_count")
        else:
            skipped = progress.get("skipped_contexts", [])
            if not (isinstance(skipped, list) and all(_is_int(c) for c in skipped)):
                raise _Problem("'progress.skipped_contexts' is not a list of context indices")
        return parsed

    @staticmethod
    def _check_running_stats(running, version: int) -> None:
        if not all(isinstance(running.get(s, {}), dict) for s in SPLITS):
            raise _Problem("'running_stats' does not hold an object per split")
        if version >= FIRST_SMALL_METADATA_VERSION:
            for split in SPLITS:
                for hook, stats in running.get(split, {}).items():
                    slot = stats.get("sum_slot") if isinstance(stats, dict) else None
                    if not (_is_int(slot) and slot < RUNNING_SUM_SLOTS):
                        raise _Problem(f"'running_stats.{split}.{hook}' names no sum slot")

    @staticmethod
    def _check_normalization(norms) -> None:
        from store_schema.normalization import MODES  # here: normalization imports torch, this module does not

        if norms is None:
            return
        if not isinstance(norms, dict):
            raise _Problem("'normalization' is not an object")
        for hook, norm in norms.items():
            if not (
                isinstance(norm, dict)
                and norm.get("mode") in MODES
                and _is_number(norm.get("scale"))
                and (norm.get("max_norm") is None or _is_number(norm["max_norm"]))
            ):
                raise _Problem(f"'normalization.{hook}' is not a mode, a scale and a max_norm")

    # -- what follows from it -----------------------------------------------------------------------
    def to_attrs(self) -> dict:
        """The root attribute as it was read (a copy)."""
        return copy.deepcopy(self._attrs)

    def width(self, hook: str) -> int:
        """The width of one hook's rows (`hook_widths`, version 3; else d_model)."""
        return self.hook_widths.get(hook, self.d_model)

    @property
    def small_metadata(self) -> bool:
        """Whether running sums and skipped contexts live in arrays (version 2 on), not in the attributes."""
        return self.schema_version >= FIRST_SMALL_METADATA_VERSION

    @property
    def first_stored_position(self) -> int:
        """Positions before this one are never stored (the attention sink at 0, by default)."""
        return len(self.dropped_positions)

    def rows_committed(self, split: str) -> int:
        return self.progress[split].rows_committed

    @property
    def tokens_fingerprint(self) -> str | None:
        """The fingerprint of the store's contexts (`tokens[:n_contexts]`), which an append must reproduce."""
        return self.text_source.get("tokens_fingerprint")

    def normalization_attrs(self, hook: str) -> dict | None:
        """The recorded normalization of `hook` as attributes (its mean vector lives in an array)."""
        saved = (self._attrs.get("normalization") or {}).get(hook)
        return copy.deepcopy(saved)

    def normalization(self, hook: str, group: zarr.Group) -> Normalization | None:
        """The normalization recorded for `hook`, None until the warm-up fixed it (`group`: the store)."""
        saved = self.normalization_attrs(hook)
        return None if saved is None else read_normalization(group, hook, saved)

    def normalizations(self, group: zarr.Group) -> dict[str, Normalization] | None:
        """Every hook's recorded normalization, None until the warm-up fixed them (`group`: the store)."""
        saved = self._attrs.get("normalization")
        if saved is None:
            return None
        return {hook: read_normalization(group, hook, record) for hook, record in saved.items()}

    def running_stats_attrs(self, split: str, hook: str) -> dict | None:
        saved = self._attrs.get("running_stats", {}).get(split, {}).get(hook)
        return copy.deepcopy(saved)

    def running_stats(self, split: str, hook: str, group: zarr.Group) -> RunningStats | None:
        """The split's committed statistics of `hook`, None before its first commit (`group`: the store)."""
        saved = self.running_stats_attrs(split, hook)
        if saved is None:
            return None
        if not self.small_metadata:  # version 1: the sum is in the attributes
            return RunningStats.from_attrs(self.d_model, saved, saved["sum"])
        return read_running_stats(group, split, hook, saved, self.width(hook))

    @property
    def skipped_count(self) -> int:
        progress = self._attrs["progress"]
        return progress["skipped_count"] if self.small_metadata else len(progress.get("skipped_contexts", []))

    @property
    def skipped_contexts_v1(self) -> list[int]:
        """Version 1 keeps the skipped contexts in the attributes."""
        return list(self._attrs["progress"].get("skipped_contexts", []))

    def records(self, *keys: str) -> dict:
        """Deep copies of the named top-level records as they are stored (for JSON: cfg.json, provenance)."""
        return {key: copy.deepcopy(self._attrs[key]) for key in keys if key in self._attrs}

    def config_fingerprints(self) -> list[str]:
        """Every configuration fingerprint the store has had: as collected, then after each append in turn
        (what a run trained on it before an append recorded)."""
        collect_config, budgets = self.to_attrs()["collect_config"], [a.tokens for a in self.appends]
        grown = [
            fingerprint({"collect_config": collect_config, "appends": budgets[: i + 1]}) for i in range(len(budgets))
        ]
        return [fingerprint(collect_config), *grown]

    # -- what a writer makes of it ------------------------------------------------------------------
    def with_append_merged(self) -> StoreHeader:
        """The header once the append under way is the store's: its rows, statistics, contexts, budget
        and tokens' fingerprint, with the append listed in `appends`. Every other record keeps its place
        in the attributes, so only the bytes of what changed change."""
        if self.pending_append is None:
            raise ValueError("the store has no append under way")
        attrs = self.to_attrs()
        pending = attrs.pop("append")
        attrs["progress"], attrs["running_stats"] = pending["progress"], pending["running_stats"]
        attrs["token_budget"] = self.pending_append.tokens
        attrs["split"] = {**attrs["split"], **{key: attrs["split"][key] + n for key, n in pending["split"].items()}}
        attrs["layout"] = {**attrs["layout"], "planned_rows": pending["planned_rows"]}
        attrs["text_source"] = {**attrs["text_source"], "tokens_fingerprint": pending["tokens_fingerprint"]}
        attrs["appends"] = attrs.get("appends", []) + [self.pending_append.to_attrs()]  # earlier ones as stored
        budgets = [a.tokens for a in (*self.appends, self.pending_append)]
        attrs["config_fingerprint"] = fingerprint({"collect_config": attrs["collect_config"], "appends": budgets})
        return StoreHeader.from_attrs(attrs)


# -- records with arrays beside them: the one place, for reader and writer, that reads them ---------------
def read_normalization(group: zarr.Group, hook: str, record: Mapping) -> Normalization:
    """A hook's normalization from its record; a center-scale mean lives in an array of the store."""
    from store_schema.normalization import Normalization

    mean = group[norm_mean_path(hook)][:] if record["mode"] == "center-scale" else None
    return Normalization.from_attrs(record, mean)


def read_running_stats(group: zarr.Group, split: str, hook: str, record: Mapping, width: int) -> RunningStats:
    """A hook's statistics from their record (version 2 on): the sum vector is in the slot it names."""
    return RunningStats.from_attrs(width, record, group[running_sum_path(split, hook)][record["sum_slot"]])
