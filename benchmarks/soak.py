"""`python -m benchmarks soak`: a store under load, for a bounded time (a benchmark, not a unit test).

One process trains from the store while two others read it and a fourth appends to it
(`collect --append`, again and again; the last append is killed at the deadline and then resumed, as
a crash would leave it). The readers check what a shared store promises:
- the committed row count never goes back;
- a row, once read, never changes (every chunk's bytes are compared with what was read before, on the
  rows both reads cover);
- every row is finite;
- nothing fails to open or read.
The report gives each process's throughput next to training alone, and whether every check held. At
the end the store must verify (every chunk against its CRC32C) and be complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.basics.errors import SaepipeError
from stages.basics.settings import setting
from store_schema.reader import ActivationStore, open_store
from store_schema.verify import verify_store

HOOK = "blocks.1.hook_resid_post"


@dataclass
class SoakConfig:
    out: str = setting("runs/soak", "work folder (a fresh store, two runs, soak.json)")
    seconds: float = setting(60.0, "how long the store is under load")
    model: str = setting("tiny-random", "the model the store is collected (and appended) from")
    hook: str = HOOK
    tokens: int = 60_000  # the store's size before the appends
    append_tokens: int = 6_000  # each append grows it by this much
    width: int = 256
    k: int = 8
    batch_size: int = 1024
    readers: int = setting(2, "reader processes")

    def validate(self) -> SoakConfig:
        if not self.seconds > 0:
            raise SaepipeError(f"--seconds must be positive, got {self.seconds}")
        if self.readers < 0 or self.tokens <= 0 or self.append_tokens <= 0:
            raise SaepipeError("--readers must be >= 0, and --tokens and --append-tokens positive")
        return self


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


class _Trainer:
    """`saepipe train` in a subprocess with more tokens than it can do, stopped when asked; its rate is
    the median of the log windows written while it was watched."""

    def __init__(self, cfg: SoakConfig, store: Path, out: Path):
        self.log = out / "train_log.jsonl"
        cmd = _cli(
            "train",
            str(store),
            "--hook",
            cfg.hook,
            "--width",
            str(cfg.width),
            "--k",
            str(cfg.k),
            "--batch-size",
            str(cfg.batch_size),
            "--tokens",
            str(10**12 // cfg.batch_size * cfg.batch_size),
            "--log-every",
            "10",
            "--checkpoint-every",
            "10000000",
            "--overwrite",
            "--no-progress",
            "--out",
            str(out),
        )
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def rows(self) -> list[dict]:
        rows = []
        for line in (self.log.read_text() if self.log.exists() else "").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written
                break
        return rows

    def wait_until_logging(self, timeout: float = 300) -> None:
        """Until the first log window (which holds start-up) is written; rates count from then on."""
        deadline = time.time() + timeout
        while not self.rows():
            if self.proc.poll() is not None or time.time() > deadline:
                raise SaepipeError(f"training did not start: {self.proc.stderr.read().strip()[-500:]}")
            time.sleep(0.05)
        self.first = len(self.rows())

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        steady = self.rows()[self.first :]
        if not steady:
            raise SaepipeError("training logged no window in the soak's time: give it more --seconds")
        return {"steps": steady[-1]["step"], "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steady]))}


def _train_alone(cfg: SoakConfig, store: Path, out: Path, seconds: float) -> dict:
    trainer = _Trainer(cfg, store, out)
    trainer.wait_until_logging()
    time.sleep(seconds)
    return trainer.stop()


def _reader(store: str, hook: str, seconds: float, seed: int, results) -> None:
    """Open the store again and again; read random whole chunks; check them against earlier reads."""
    rng = np.random.default_rng(seed)
    seen: dict[int, np.ndarray] = {}
    report = {"opens": 0, "rows_read": 0, "problems": [], "max_rows_seen": 0}
    deadline = time.time() + seconds
    start = time.time()
    last_rows = 0
    while time.time() < deadline:
        try:
            view = ActivationStore.open(store)
            report["opens"] += 1
            n = view.n_rows("train")
            if n < last_rows:
                report["problems"].append(f"committed rows went back from {last_rows} to {n}")
            last_rows = n
            chunk = view.chunk_rows
            for _ in range(16):
                c = int(rng.integers(0, -(-n // chunk)))
                rows = view.read_rows("train", hook, c * chunk, min(n, (c + 1) * chunk))
                report["rows_read"] += len(rows)
                if not np.isfinite(rows).all():
                    report["problems"].append(f"non-finite values in chunk {c}")
                before = seen.get(c)
                if before is not None:  # compare the rows both reads cover (a last chunk grows)
                    common = min(len(before), len(rows))
                    if not np.array_equal(before[:common], rows[:common]):
                        report["problems"].append(f"chunk {c} changed between reads")
                if before is None or len(rows) > len(before):
                    seen[c] = rows
        except Exception as e:  # any failure to open or read is a finding, not a crash of the soak
            report["problems"].append(f"{type(e).__name__}: {e}")
    report["max_rows_seen"] = last_rows
    report["rows_per_s"] = report["rows_read"] / (time.time() - start)
    report["problems"] = report["problems"][:20]
    results.put(report)


def _appender(cfg: SoakConfig, store: Path, seconds: float) -> dict:
    """Append again and again until the deadline; the append in flight then is killed and resumed."""
    deadline = time.time() + seconds
    done = 0
    tokens = open_store(store).header.token_budget
    while True:
        tokens += cfg.append_tokens
        cmd = _cli("collect", "--append", str(store), "--tokens", str(tokens), "--no-progress")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:  # the deadline: kill it as a crash would, then resume it
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            resumed = subprocess.run(cmd, capture_output=True, text=True)
            if resumed.returncode != 0:
                raise SaepipeError(f"resuming the killed append failed: {resumed.stderr.strip()[-500:]}")
            return {"appends": done + 1, "last_append_killed_and_resumed": True, "tokens": tokens}
        if proc.returncode != 0:
            raise SaepipeError(f"append to {tokens:,} tokens failed: {proc.stderr.read().strip()[-500:]}")
        done += 1
        if time.time() >= deadline:
            return {"appends": done, "last_append_killed_and_resumed": False, "tokens": tokens}


def run_soak(cfg: SoakConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store.zarr"
    collect = _cli(
        "collect",
        "--model",
        cfg.model,
        "--hook",
        cfg.hook,
        "--tokens",
        str(cfg.tokens),
        "--context-size",
        "64",
        "--chunk-rows",
        "1024",
        "--no-progress",
        "--overwrite",
        "--out",
        str(store),
    )
    print(f"soak: collecting a {cfg.tokens:,}-token store from {cfg.model}", file=sys.stderr)
    subprocess.run(collect, check=True, capture_output=True)
    print(f"soak: training alone for {cfg.seconds / 3:.0f} s", file=sys.stderr)
    alone = _train_alone(cfg, store, out / "train_alone", cfg.seconds / 3)

    print(f"soak: training + {cfg.readers} readers + appends for {cfg.seconds:.0f} s", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    readers = [
        context.Process(target=_reader, args=(str(store), cfg.hook, cfg.seconds, seed, results))
        for seed in range(cfg.readers)
    ]
    trainer = _Trainer(cfg, store, out / "train_loaded")
    trainer.wait_until_logging()
    for reader in readers:
        reader.start()
    appended = _appender(cfg, store, cfg.seconds)
    loaded = trainer.stop()
    reader_reports = [results.get(timeout=120) for _ in readers]
    for reader in readers:
        reader.join()

    final = open_store(store)
    verification = verify_store(final, progress=False)
    report = {
        "seconds": cfg.seconds,
        "model": cfg.model,
        "machine": f"{os.cpu_count()} cores",
        "train_alone_tokens_per_s": alone["tokens_per_s"],
        "train_under_load_tokens_per_s": loaded["tokens_per_s"],
        "readers": reader_reports,
        "appender": appended,
        "final_store": {
            "complete": final.complete,
            "train_rows": final.n_rows("train"),
            "chunks_verified": verification.checked,
            "damaged": verification.damaged,
        },
    }
    report["consistent"] = (
        final.complete and not verification.damaged and all(not r["problems"] for r in reader_reports)
    )
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
