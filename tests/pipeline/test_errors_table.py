"""docs/errors.md as a test: each row's trigger, run through the CLI, exits with the row's code and
prints the row's message as one error line, the last one, with no traceback, and writes nothing."""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from stages import host_model as host_models
from stages.basics import run_dir
from stages.train.checkpoint import Checkpoint
from store_schema.generated import write_array_store
from store_schema.lock import lock_path
from store_schema.writer import StoreWriter
from tests.helpers.cli import run_catching, run_ok
from tests.helpers.files import REPO, poison_chunk

DOC = REPO / "docs" / "errors.md"
COLUMNS = ["id", "trigger", "message", "exit", "setup"]
HARNESSES = "python -m benchmarks "  # the measurement harnesses' command line (benchmarks/cli.py)
PROGRAMS = ("saepipe ", HARNESSES)
HOOK = "blocks.2.hook_resid_post"
TRAIN_CHUNK = Path("train") / "acts" / HOOK / "c" / "1" / "0"  # one chunk file of {store}'s training rows


@dataclass(frozen=True)
class Row:
    id: str
    trigger: str  # the command line, "saepipe ..." (or "python -m benchmarks ...") with {placeholders}
    fragments: tuple[str, ...]  # each must be in the error line
    exit_code: int
    setup: str  # a key of SETUPS, or ""


_CODE = re.compile(r"``\s?(.+?)\s?``|`([^`]+)`")


def _code_spans(cell: str) -> list[str]:
    return [a or b for a, b in _CODE.findall(cell)]


def parse_table(text: str) -> list[Row]:
    """The rows of every table whose header is COLUMNS. A malformed row is an error, not skipped."""
    rows, header = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
            continue
        if header != COLUMNS or all(set(c) <= set("-: ") for c in cells):
            continue
        assert len(cells) == len(COLUMNS), f"errors.md line {number}: {len(cells)} cells, expected {len(COLUMNS)}"
        row_id, trigger, message, exit_code, setup = cells
        triggers, fragments = _code_spans(trigger), tuple(_code_spans(message))
        assert len(triggers) == 1 and triggers[0].startswith(PROGRAMS), f"errors.md line {number}: trigger"
        assert fragments, f"errors.md line {number}: no `message` fragment"
        assert exit_code.isdigit(), f"errors.md line {number}: exit code {exit_code!r}"
        rows.append(Row(row_id, triggers[0], fragments, int(exit_code), setup))
    return rows


ROWS = parse_table(DOC.read_text())


def harness_cli():
    from benchmarks.cli import main as harnesses

    return harnesses


# -- the placeholders -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """Every placeholder but {tmp}, made once (about 8 s on 2 CPU cores, most of it the first collect), and
    "root", the folder holding them all."""
    root = tmp_path_factory.mktemp("errors-table")
    p = {
        name: root / name
        for name in (
            "store",
            "multi",
            "incomplete",
            "narrow",
            "synthetic",
            "other_hook",
            "run",
            "unevaluated",
            "folder",
            "file",
        )
    }
    run_ok(
        "collect",
        "--model",
        "tiny-random",
        "--hook",
        HOOK,
        "--tokens",
        4000,
        "--context-size",
        32,
        "--chunk-rows",
        512,
        "--shard-chunks",  # a file per chunk: the rows that damage {store} name its chunk files
        1,
        "--no-progress",
        "--out",
        p["store"],
        catch_exceptions=True,
    )
    run_ok(
        "collect",
        "--model",
        "tiny-random",
        "--hook",
        "blocks.1.hook_resid_post",
        "--hook",
        HOOK,
        "--tokens",
        1000,
        "--context-size",
        32,
        "--eval-fraction",
        0,
        "--no-progress",
        "--out",
        p["multi"],
        catch_exceptions=True,
    )
    shutil.copytree(p["store"], p["incomplete"])
    StoreWriter.open(p["incomplete"])._update(complete=False)
    rng = np.random.default_rng(0)
    for name, d, hook in (
        ("narrow", 32, HOOK),
        ("synthetic", 64, HOOK),
        ("other_hook", 64, "blocks.1.hook_resid_post"),
    ):
        write_array_store(p[name], rng.standard_normal((600, d)), rng.standard_normal((60, d)), hook=hook)
    for name in ("run", "unevaluated"):
        run_ok(
            "train",
            p["store"],
            "--width",
            64,
            "--k",
            4,
            "--tokens",
            2048,
            "--batch-size",
            512,
            "--no-progress",
            "--out",
            p[name],
            catch_exceptions=True,
        )
    run_ok("eval", p["run"], "--no-model", "--no-progress", catch_exceptions=True)
    p["folder"].mkdir()
    (p["folder"] / "notes.txt").write_text("not a store, not a run\n")
    p["file"].write_text("a plain file\n")
    return p | {"root": root}


LAZY_PLACES = {"gpt2": lambda request: request.getfixturevalue("tiny_gpt2_dir")[0]}  # conftest.py


# -- the setups: each prepares {tmp} (or the process) for its rows ---------------------------------------


def _data(tmp: Path, places: dict, monkeypatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {
        "short.txt": "hello\n",
        "good.jsonl": '{"text": "hello world"}\n',
        "body.jsonl": '{"body": "hello"}\n',
        "numbers.jsonl": '{"text": 5}\n',
        "empty.jsonl": "",
        "bad.jsonl": "not json\n",
        "more.jsonl": "not json\n",
        "junk.parquet": "not parquet\n",
        "notes.csv": "a,b\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp / "empty.parquet")


def _offline(tmp: Path, places: dict, monkeypatch) -> None:
    pass  # every row runs with the hub offline (the autouse fixture); the key marks the rows that need it


def _no_gpu(tmp: Path, places: dict, monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("the row is about a machine without CUDA")


def _bad_model_dir(tmp: Path, places: dict, monkeypatch) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")


def _lock(holder: dict):
    def setup(tmp: Path, places: dict, monkeypatch) -> None:
        lock_path(tmp / "s.zarr").write_text(json.dumps(holder | {"started": "2026-01-01 00:00:00"}))

    return setup


def _copy_store(tmp: Path, places: dict, name: str) -> Path:
    return Path(shutil.copytree(places["store"], tmp / name))


def _other_weights(tmp: Path, places: dict, monkeypatch) -> None:
    writer = StoreWriter.open(_copy_store(tmp, places, "s.zarr"))
    writer._update(complete=False, model=dict(writer.attrs["model"], revision="other-weights"))


def _zarr_group(tmp: Path, places: dict, monkeypatch) -> None:
    import zarr

    zarr.open_group(str(tmp / "plain.zarr"), mode="w")


def _newer_schema(tmp: Path, places: dict, monkeypatch) -> None:
    StoreWriter.open(_copy_store(tmp, places, "newer.zarr"))._update(schema_version=99)


def _old_schema(tmp: Path, places: dict, monkeypatch) -> None:
    shutil.copytree(REPO / "tests" / "store_schema" / "v1_store" / "store.zarr", tmp / "v1.zarr")


def _damaged_chunk(tmp: Path, places: dict, monkeypatch) -> None:
    chunk = _copy_store(tmp, places, "damaged.zarr") / TRAIN_CHUNK
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def _nonfinite_rows(tmp: Path, places: dict, monkeypatch) -> None:
    """inf in the first rows of every activation chunk, each checksummed anew: only verify's finiteness
    check, training and eval find it."""
    store = _copy_store(tmp, places, "nan.zarr")
    for chunk in sorted(store.glob(f"*/acts/{HOOK}/c/*/0")):
        poison_chunk(chunk, 64, np.inf)


def _zero_scale(tmp: Path, places: dict, monkeypatch) -> None:
    store = _copy_store(tmp, places, "scale.zarr")
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["saepipe"]["normalization"][HOOK]["scale"] = 0
    (store / "zarr.json").write_text(json.dumps(root))


def _nan_weights(tmp: Path, places: dict, monkeypatch) -> None:
    from safetensors.torch import load_file, save_file

    run = Path(shutil.copytree(places["run"], tmp / "run"))
    weights = load_file(run / run_dir.SAE_WEIGHTS)
    weights["W_dec"][0, 0] = float("nan")
    save_file(weights, run / run_dir.SAE_WEIGHTS)


def _replaced_store(tmp: Path, places: dict, monkeypatch) -> None:
    """`{tmp}/run`: `{run}` as if its store had been collected again since (the fingerprint its training and
    its eval recorded differs)."""
    run = Path(shutil.copytree(places["run"], tmp / "run"))
    config = json.loads((run / run_dir.CONFIG).read_text())
    config["store"]["fingerprint"] = "0123456789abcdef"
    (run / run_dir.CONFIG).write_text(json.dumps(config))
    record = json.loads((run / run_dir.EVAL).read_text())
    record["store_fingerprint"] = "0123456789abcdef"
    (run / run_dir.EVAL).write_text(json.dumps(record))


def _gone_store(tmp: Path, places: dict, monkeypatch) -> None:
    """`{tmp}/run`: `{run}` as if its store (and the one its eval used) had been deleted since."""
    run = Path(shutil.copytree(places["run"], tmp / "run"))
    for name, where in ((run_dir.CONFIG, ("store", "path")), (run_dir.EVAL, ("store",))):
        document = json.loads((run / name).read_text())
        inner = document
        for key in where[:-1]:
            inner = inner[key]
        inner[where[-1]] = str(tmp / "gone.zarr")
        (run / name).write_text(json.dumps(document))


def _edited(name: str, change):
    """`{tmp}/run`: `{run}` whose JSON file `name` was edited by hand (`change(document)`)."""

    def setup(tmp: Path, places: dict, monkeypatch) -> None:
        run = Path(shutil.copytree(places["run"], tmp / "run"))
        document = json.loads((run / name).read_text())
        change(document)
        (run / name).write_text(json.dumps(document))

    return setup


def _odd_checkpoint(tmp: Path, places: dict, monkeypatch) -> None:
    """`{tmp}/run` holds a checkpoint whose JSON document is a list, not the checkpoint's record."""
    from safetensors.torch import save_file

    (tmp / "run").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp / "run" / run_dir.CHECKPOINT), metadata={"saepipe_checkpoint": "[1, 2]"})


def _missing_chunk(tmp: Path, places: dict, monkeypatch) -> None:
    (_copy_store(tmp, places, "damaged.zarr") / TRAIN_CHUNK).unlink()


def _no_s3fs(tmp: Path, places: dict, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)
    # fsspec keeps the classes it has imported: forget S3's, so that it imports s3fs again (and fails)
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)


def _no_saelens(tmp: Path, places: dict, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sae_lens", None)


def _no_wandb(tmp: Path, places: dict, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)


def _wandb_logged_out(tmp: Path, places: dict, monkeypatch) -> None:
    import wandb

    def init(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", init)
    (tmp / "run").mkdir()  # training prepares the folder before it starts the wandb run, and leaves it empty


def _no_wheel(tmp: Path, places: dict, monkeypatch) -> None:
    monkeypatch.setattr(host_models.loading, "prepare_default_model", _real_prepare_default_model)  # undo the guard
    monkeypatch.setattr(host_models.smollm2, "smollm2_gguf_path", lambda: None)
    monkeypatch.setenv("SAEPIPE_CACHE", str(tmp / "cache"))  # no converted model there


def _stale_checkpoint(tmp: Path, places: dict, monkeypatch) -> None:
    (tmp / "run").mkdir()
    Checkpoint(
        step=0,
        sae={},
        optimizer={"state": {}, "param_groups": []},
        scheduler={},
        tokens_since_fired=torch.zeros(1),
        mse_scale=1.0,
        store_fingerprint="another store",
        config={},
    ).save(tmp / "run" / run_dir.CHECKPOINT)


class _RunsCode:
    """Unpickling this creates a file: the proof that a pickle was opened."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["SAEPIPE_PICKLE_MARKER"]),))


def _pickled_checkpoint(tmp: Path, places: dict, monkeypatch) -> None:
    (tmp / "run").mkdir()
    monkeypatch.setenv("SAEPIPE_PICKLE_MARKER", str(tmp / "pickle-ran"))
    torch.save({"step": 1, "payload": _RunsCode()}, tmp / "run" / run_dir.PICKLED_CHECKPOINT)


def _damaged_checkpoint(tmp: Path, places: dict, monkeypatch) -> None:
    _stale_checkpoint(tmp, places, monkeypatch)
    path = tmp / "run" / run_dir.CHECKPOINT
    path.write_bytes(path.read_bytes()[:40])


def _unfinished_run(tmp: Path, places: dict, monkeypatch) -> None:
    (tmp / "run").mkdir()
    shutil.copy(places["run"] / "cfg.json", tmp / "run" / "cfg.json")


def _read_only_tmp(tmp: Path, places: dict, monkeypatch) -> None:
    """`{tmp}` on read-only media, as the OS reports it (EROFS; root ignores chmod), after `{run}` was copied
    to `{tmp}/run`: creating a file or a folder there fails, reading works."""
    shutil.copytree(places["run"], tmp / "run")
    real_open, real_mkdir = os.open, Path.mkdir
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def read_only(path) -> OSError:
        return OSError(errno.EROFS, "Read-only file system", str(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & writes and Path(path).absolute().is_relative_to(tmp):
            raise read_only(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(self, *args, **kwargs):
        if self.absolute().is_relative_to(tmp) and not self.exists() and self.parent.exists():
            raise read_only(self)  # as the OS does, a missing parent is named first (ENOENT)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(Path, "mkdir", guarded_mkdir)


def _damaged(name: str, garble):
    def setup(tmp: Path, places: dict, monkeypatch) -> None:
        run = Path(shutil.copytree(places["run"], tmp / "run"))
        (run / name).write_bytes(garble((run / name).read_bytes()))

    return setup


SETUPS = {
    "old_schema": _old_schema,
    "data": _data,
    "offline": _offline,
    "no_gpu": _no_gpu,
    "bad_model_dir": _bad_model_dir,
    "locked": _lock({"pid": os.getpid(), "host": socket.gethostname()}),  # this process: alive
    "locked_elsewhere": _lock({"pid": 4242, "host": "elsewhere"}),
    "other_weights": _other_weights,
    "zarr_group": _zarr_group,
    "newer_schema": _newer_schema,
    "damaged_chunk": _damaged_chunk,
    "missing_chunk": _missing_chunk,
    "nonfinite_rows": _nonfinite_rows,
    "zero_scale": _zero_scale,
    "nan_weights": _nan_weights,
    "replaced_store": _replaced_store,
    "gone_store": _gone_store,
    "huge_cfg": _edited(run_dir.CONFIG, lambda config: config["sae"].update(d_sae=10**12)),
    "no_store_cfg": _edited(run_dir.CONFIG, lambda config: config.pop("store")),
    "word_k_cfg": _edited(run_dir.CONFIG, lambda config: config["sae"].update(k="eight")),
    "word_scale_cfg": _edited(run_dir.CONFIG, lambda config: config["normalization"].update(scale="big")),
    "odd_checkpoint": _odd_checkpoint,
    "no_s3fs": _no_s3fs,
    "no_saelens": _no_saelens,
    "no_wandb": _no_wandb,
    "wandb_logged_out": _wandb_logged_out,
    "no_wheel": _no_wheel,
    "stale_checkpoint": _stale_checkpoint,
    "pickled_checkpoint": _pickled_checkpoint,
    "damaged_checkpoint": _damaged_checkpoint,
    "unfinished_run": _unfinished_run,
    "damaged_cfg": _damaged("cfg.json", lambda data: b"{not json"),
    "damaged_eval": _damaged("eval.json", lambda data: b"{not json"),
    "damaged_log": _damaged("train_log.jsonl", lambda data: data.split(b"\n", 1)[0] + b"\n{not json\n"),
    "damaged_weights": _damaged("sae.safetensors", lambda data: b"garbage"),
    "read_only_tmp": _read_only_tmp,
    "damaged_density": _damaged(run_dir.FEATURE_DENSITY, lambda data: b"garbage"),
    "edited_eval": _edited(run_dir.EVAL, lambda record: record.update(fve="high")),
    "edited_histogram": _edited(run_dir.EVAL, lambda record: record["log10_density_histogram"].update(edges=[0])),
}

_real_prepare_default_model = host_models.prepare_default_model


def _no_default_model():
    raise AssertionError("a row loaded the default model smollm2-135m: its trigger no longer fails before that")


@pytest.fixture(autouse=True)
def _guards(monkeypatch):
    """No row reaches the network or loads the default model, whatever its trigger does."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(host_models.loading, "prepare_default_model", _no_default_model)


# -- the tests --------------------------------------------------------------------------------------


def _substitute(text: str, values: dict[str, str], quote: bool) -> str:
    def value(match: re.Match) -> str:
        assert match.group(1) in values, f"unknown placeholder {match.group(0)}"
        return shlex.quote(values[match.group(1)]) if quote else values[match.group(1)]

    return re.sub(r"\{(\w+)\}", value, text)


def _snapshot(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (size, mtime) and folder under the roots."""
    return {
        str(p): ((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None)
        for root in roots
        for p in root.rglob("*")
    }


def test_the_table_has_rows_with_unique_ids_and_known_setups():
    assert len(ROWS) >= 100, len(ROWS)  # 149 rows when written: a floor against a parser that stops reading
    ids = [row.id for row in ROWS]
    assert len(set(ids)) == len(ids), sorted({i for i in ids if ids.count(i) > 1})
    for row in ROWS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", row.id), row.id
        assert row.setup in SETUPS or row.setup == "", (row.id, row.setup)


def test_the_parser_reads_code_spans_and_refuses_malformed_rows():
    table = "| id | trigger | message | exit | setup |\n| --- | --- | --- | --- | --- |\n"
    rows = parse_table(table + "| a-b | `saepipe x {tmp}` | ``run `y` first`` `and z` | 2 | data |\n")
    assert rows == [Row("a-b", "saepipe x {tmp}", ("run `y` first", "and z"), 2, "data")]
    for bad in (
        "| a | saepipe x | `m` | 2 | |",
        "| a | `saepipe x` | m | 2 | |",
        "| a | `saepipe x` | `m` | two | |",
        "| a | `saepipe x` | `m` | 2 |",
    ):
        with pytest.raises(AssertionError):
            parse_table(table + bad + "\n")


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_each_documented_error_is_one_line_with_its_exit_code_and_writes_nothing(
    row: Row, places, tmp_path, monkeypatch, request
):
    values = {name: str(path) for name, path in places.items() if name != "root"} | {"tmp": str(tmp_path)}
    for name, make in LAZY_PLACES.items():
        if "{" + name + "}" in row.trigger:
            values[name] = str(make(request))
    if row.setup:
        SETUPS[row.setup](tmp_path, places, monkeypatch)
    monkeypatch.chdir(tmp_path)  # a default output folder (report/, runs/bench) would land here, and be seen
    harness = row.trigger.startswith(HARNESSES)
    args = shlex.split(_substitute(row.trigger, values, quote=True))[3 if harness else 1 :]
    before = _snapshot(places["root"], tmp_path)

    result = run_catching(*args, cli=harness_cli() if harness else main)

    output = result.output
    crash = (
        ""
        if result.exc_info is None or isinstance(result.exception, SystemExit)
        else "".join(traceback.format_exception(*result.exc_info))
    )
    assert result.exit_code == row.exit_code, f"exit {result.exit_code}, expected {row.exit_code}\n{output}{crash}"
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    prefix = "Error: " if row.id.startswith("usage-") else "error: "  # click's usage errors, or ours
    errors = [line for line in lines if line.lower().startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith(prefix), output
    for fragment in row.fragments:
        assert _substitute(fragment, values, quote=False) in errors[0], (fragment, errors[0])
    after = _snapshot(places["root"], tmp_path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, "gone") != after.get(k, "gone"))
    assert not changed, f"the refused command wrote or changed: {changed}"
