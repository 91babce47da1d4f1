"""Running one measurement in a fresh Python process, so that its peak memory is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from stages.basics.errors import SaepipeError

_CHILD = """
import importlib, json, sys
module, function = sys.argv[1].rsplit(".", 1)
result = getattr(importlib.import_module(module), function)(json.loads(sys.argv[2]))
print("\\n" + json.dumps(result))
"""


def peak_rss_bytes() -> int:
    """This process's peak resident set size: the kernel's high-water mark of this process image
    (VmHWM). Not getrusage's ru_maxrss where VmHWM exists: Linux carries that across fork and exec, so a
    child would report its parent's peak."""
    try:
        return _status_bytes("VmHWM:")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    """This process's resident set size now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024


def run_in_child(function: str, args: dict, what: str, show_progress: bool = False) -> dict:
    """`function(args)` (a dotted name; it returns a JSON-able dict) in a fresh interpreter; its result.
    Its stderr (progress bars) passes through when `show_progress`."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, function, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=None if show_progress else subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines() or [f"exit status {done.returncode}"]
        raise SaepipeError(f"{what} failed: {tail[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
