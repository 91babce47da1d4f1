"""Reading back what an offline wandb run wrote: its `run-ID.wandb` file, a log of protobuf records in
wandb's block format (that of LevelDB's log: 32 KiB blocks, each record a 7-byte header of CRC, length
and type, a record longer than its block split into first/middle/last pieces), after a 7-byte file
header (`:W&B`, a magic number and a version). wandb ships no Python reader of it (its Go core writes
and syncs it), so this is one, enough for the tests."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import wandb
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # both the file's and each record's
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """Every record of a .wandb file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    out, pieces, offset = [], [], HEADER
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:  # the rest of a block too short for a header is padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if length == 0 and kind == 0:  # zero padding
            offset += left_in_block
            continue
        body = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        pieces.append(body)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            out.append(record)
            pieces = []
    return out


@dataclass
class OfflineRun:
    """What one offline run's file holds, decoded."""

    folder: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # each logged row, with "_step"
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None

    @property
    def media(self) -> list[Path]:
        return sorted((self.folder / "files" / "media").rglob("*.png"))


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_offline_run(folder: Path) -> OfflineRun:
    """One `offline-run-*` folder's run: its identity, config, history rows, summary and exit code."""
    (path,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun(Path(folder))
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.name = record.run.run_id, record.run.project, record.run.display_name
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under a `wandb/` folder, oldest first (a resumed run has one folder per session).
    A finished run's last records reach its file a moment after run.finish() returns (wandb's service
    writes them): wandb.teardown() waits for the service, as the end of a `saepipe` process does."""
    wandb.teardown()
    return [read_offline_run(folder) for folder in sorted(Path(wandb_dir).glob("offline-run-*"))]
