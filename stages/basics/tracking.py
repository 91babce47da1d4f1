"""Experiment tracking with Weights & Biases: `saepipe train --wandb PROJECT` logs each training-log line
as it is written, and the run's config; `saepipe eval` and `saepipe report` add the eval keys and the
report's plots to the same wandb run.

wandb is optional (`pip install 'saepipe[wandb]'`) and slow to import: it is imported only when a run is
tracked. The wandb run's identity (project, id, name, entity) and the last step it was sent are kept in
the run folder (run_dir.WANDB, written when tracking starts and after each line), so that `--resume`
continues the same wandb run without sending a step twice, and eval and report find it. wandb writes
its own files under the run folder (run_dir.WANDB_FILES; `wandb sync` uploads an offline run's).

Tracking never costs training work: once a run trains, a failure of wandb is one warning and tracking
stops; eval and report warn and go on when wandb is missing or fails. WANDB_MODE=offline records
locally, WANDB_MODE=disabled turns every wandb call into nothing (wandb's own switches).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from stages.basics import run_dir
from stages.basics.errors import SaepipeError, first_line

INSTALL = "pip install 'saepipe[wandb]'"


def require_wandb():
    """The wandb module, or a one-line SaepipeError naming the extra that installs it."""
    try:
        import wandb
    except ImportError:
        raise SaepipeError(f"--wandb needs the wandb package, which is not installed: {INSTALL}") from None
    return wandb


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _settings(wandb):
    # our own one line says where the run is; the training prints its own progress (no console capture)
    return wandb.Settings(silent=True, console="off")


def _init(wandb, folder: Path, **kwargs):
    # several runs in one process: a sweep tracks one wandb run per SAE, all open at once
    return wandb.init(dir=str(folder), reinit="create_new", settings=_settings(wandb), **kwargs)


def recorded(folder: Path) -> dict | None:
    """The wandb run a run folder was tracked in, if it was (and the file is readable)."""
    path = Path(folder) / run_dir.WANDB
    if not path.is_file():
        return None
    try:
        identity = json.loads(path.read_text())
    except (OSError, ValueError):
        _warn(f"{path} is damaged: the run's wandb run is not known")
        return None
    return identity if isinstance(identity, dict) and identity.get("id") and identity.get("project") else None


def _numbers(values: dict, prefix: str = "") -> dict:
    """The numeric entries of `values` (nested dicts flattened as a/b), booleans and the rest left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """One training run's wandb run; a no-op without one (no --wandb, a rank other than 0, or after
    wandb failed)."""

    def __init__(self, run=None, folder: Path | None = None, identity: dict | None = None):
        self.run, self.folder, self.identity = run, folder, identity or {}

    @classmethod
    def start(cls, folder: Path, project: str | None, name: str | None, config: dict) -> Tracker:
        """Start the wandb run of the run folder `folder` (prepared for training), with `config` (cfg.json's
        content); or continue the one recorded there, in the same project, by an earlier attempt (which
        --resume continues). `name`: the wandb run's name (the run folder's by default). A run that cannot
        start is a one-line SaepipeError: nothing is trained yet."""
        if project is None:
            return cls()
        wandb = require_wandb()
        folder = Path(folder)
        earlier = recorded(folder)  # only a --resume finds one: a fresh run's folder is empty
        if earlier is not None and earlier["project"] != project:
            earlier = None  # another project: a new wandb run there, which gets the kept log lines too
        kwargs = {"project": project, "name": name or folder.resolve().name, "config": config}
        if earlier is not None:
            kwargs |= {"id": earlier["id"], "resume": "allow", "entity": earlier.get("entity") or None}
        files_before = (folder / run_dir.WANDB_FILES).exists()
        try:
            run = _init(wandb, folder, **kwargs)
        except Exception as e:  # wandb's errors (not logged in, unreachable, bad project) have no common base
            if not files_before:  # leave the run folder as it was: the same command can run again
                shutil.rmtree(folder / run_dir.WANDB_FILES, ignore_errors=True)
            raise SaepipeError(
                f"wandb could not start a run in project {project!r} ({first_line(e, 200)}): run `wandb login`, "
                f"or set WANDB_MODE=offline to record it in the run folder"
            ) from None
        if getattr(run, "disabled", False):  # WANDB_MODE=disabled: nothing to record, nor to continue later
            return cls()
        identity = {
            "project": project,
            "id": run.id,
            "name": run.name or kwargs["name"],
            "entity": getattr(run, "entity", "") or None,
            # the steps the wandb run already holds (a resumed run redoes the steps after its checkpoint)
            "last_step": earlier.get("last_step", 0) if earlier is not None else 0,
        }
        tracker = cls(run, folder, identity)
        tracker._save()
        offline = getattr(run, "offline", False)  # (asking an offline run for its URL is a warning)
        where = f"offline, in {folder / run_dir.WANDB_FILES} (`wandb sync` uploads it)" if offline else run.url
        print(f"wandb: run {identity['name']} ({run.id}) in project {project}: {where}", file=sys.stderr)
        return tracker

    def _save(self) -> None:
        run_dir.write_json_atomic(self.folder / run_dir.WANDB, self.identity)

    def _failed(self, what: str, e: Exception) -> None:
        _warn(f"wandb failed {what} ({first_line(e, 200)}); training goes on without tracking")
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1)
        except Exception:
            pass

    def log(self, row: dict) -> None:
        """One training-log line, at its step; a step the wandb run already holds is not sent again."""
        if self.run is None or row["step"] <= self.identity["last_step"]:
            return
        try:
            self.run.log(dict(row), step=row["step"])
        except Exception as e:
            self._failed("to log a line", e)
            return
        self.identity["last_step"] = row["step"]
        self._save()

    def log_rows(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.log(row)

    def finish(self, config: dict | None = None) -> None:
        """The run trained: record its final config (cfg.json's content), and close the wandb run."""
        if self.run is None:
            return
        try:
            if config is not None:
                self.run.config.update(config, allow_val_change=True)
            self.run.finish()
        except Exception as e:
            _warn(f"wandb failed to finish its run ({first_line(e, 200)})")
        self.run = None

    def fail(self) -> None:
        """The training stopped (an error, Ctrl-C): close the wandb run as failed, so that it does not hang."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1)
        except Exception as e:
            _warn(f"wandb failed to close its run ({first_line(e, 200)})")


def _log_to_recorded(folder: Path, what: str, make_row) -> None:
    """Continue the wandb run recorded in `folder` (if any) and log `make_row(wandb)`, with `summary`
    numbers; wandb missing or failing is one warning, never an error."""
    identity = recorded(folder)
    if identity is None:
        return
    try:
        import wandb
    except ImportError:
        _warn(
            f"{folder} was tracked in wandb project {identity['project']}, but wandb is not installed: "
            f"its {what} is not logged there ({INSTALL})"
        )
        return
    try:
        run = _init(
            wandb,
            Path(folder),
            project=identity["project"],
            id=identity["id"],
            name=identity.get("name"),
            entity=identity.get("entity") or None,
            resume="allow",
        )
    except Exception as e:
        _warn(f"wandb could not continue the run of {folder} ({first_line(e, 200)}): its {what} is not logged there")
        return
    try:
        row, summary = make_row(wandb)
        run.log(row)
        for key, value in summary.items():
            run.summary[key] = value
        run.finish()
    except Exception as e:
        _warn(f"wandb failed to log the {what} of {folder} ({first_line(e, 200)})")
        try:
            run.finish(exit_code=1)
        except Exception:
            pass


def log_eval(folder: Path, result: dict) -> None:
    """eval.json's numbers, as `eval/KEY`, into the run folder's wandb run (a log row and its summary); the
    SAE's settings are in the run's config already."""
    numbers = {f"eval/{key}": value for key, value in _numbers(result).items() if not key.startswith("sae/")}
    _log_to_recorded(folder, "eval", lambda wandb: (numbers, numbers))


def log_images(folder: Path, images: dict[str, Path]) -> None:
    """PNG files, by key, into the run folder's wandb run (one log row)."""
    if images:
        _log_to_recorded(
            folder, "report", lambda wandb: ({key: wandb.Image(str(path)) for key, path in images.items()}, {})
        )
