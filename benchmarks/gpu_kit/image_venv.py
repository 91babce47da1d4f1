"""A CPU virtual environment that copies the lent GPU machines' image, for proving the GPU kit here.

`make gpu-kit-proof` builds it, installs the kit into it exactly as the device does, and runs the kit's
script with `--device cpu` to the end. It holds the image's versions of every package saepipe's code (and
what it imports) touches, and nothing the image lacks: a package missing from the kit then fails here
as it would there, at no device time.

What cannot be copied, and is reported: the image's Python is 3.12.3 (here: the newest 3.12 found), and
its torch is torch 2.11.0+cu130 from PyPI with its CUDA libraries, here without a GPU (about 5 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_kit.image import IMAGE_PACKAGES, image_pins, normalized

# The image's packages that saepipe and the packages it imports use. Pinned where the image's version is
# known (image.txt); the rest take the newest release pip finds that fits the pins.
USED_FROM_IMAGE = (
    "torch", "transformers", "numpy", "safetensors", "tokenizers", "huggingface-hub", "accelerate", "jaxtyping",
    "sentencepiece", "einops", "pandas", "pyarrow", "fsspec", "tqdm", "click", "scipy", "scikit-learn",
    "matplotlib", "psutil", "rich", "pyyaml", "requests", "aiohttp", "xxhash", "msgpack", "cloudpickle", "toolz",
    "sortedcontainers", "regex", "jinja2", "protobuf", "typing-extensions", "packaging", "filelock", "httpx",
    "pytest", "hypothesis", "wadler-lindig",
)  # fmt: skip


def find_python312() -> str:
    """The newest Python 3.12 on this machine (PATH, then pyenv's versions)."""
    candidates = [shutil.which("python3.12") or ""]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))[::-1]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    sys.exit("error: no Python 3.12 found: install one (e.g. `pyenv install 3.12`) and pass --python")


def build(venv: Path, python: str) -> dict[str, str]:
    """Create (or reuse) the venv, install the image's packages; returns its installed versions."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pins = image_pins()
    wanted = [f"{name}=={pins[normalized(name)]}" if normalized(name) in pins else name for name in USED_FROM_IMAGE]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *wanted], check=True)
    # The newest release of an image package whose version the list does not give may need a package the
    # image lacks (typer's needs pydantic): removed, so that the kit must bring whatever saepipe imports.
    foreign = sorted(name for name in installed_versions(venv) if name not in IMAGE_PACKAGES | {"pip", "setuptools"})
    if foreign:
        print(f"removed from the image copy, as the image lacks them: {', '.join(foreign)}")
        subprocess.run([*pip[:3], "uninstall", "-q", "-y", *foreign], check=True)
    return installed_versions(venv)


def installed_versions(venv: Path) -> dict[str, str]:
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {normalized(p["name"]): p["version"] for p in json.loads(listed)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(".venv-gpu-image"))
    parser.add_argument("--python", default=None, help="a Python 3.12 (default: the newest found)")
    args = parser.parse_args(argv)
    python = args.python or find_python312()
    installed = build(args.venv, python)
    version = subprocess.run([str(args.venv / "bin/python"), "--version"], capture_output=True, text=True).stdout
    pins = image_pins()
    print(f"{args.venv}: {version.strip()} (the image: Python 3.12.3)")
    for name in sorted(installed):
        differs = f"  (the image: {pins[name]})" if name in pins and pins[name] != installed[name] else ""
        print(f"  {name}=={installed[name]}{differs}")


if __name__ == "__main__":
    main()
