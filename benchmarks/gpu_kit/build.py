"""`make gpu-kit`: the folder that a lent GPU machine needs to run the GPU check on its first call.

The machine's image has torch, transformers and most of the scientific stack but can fetch nothing, and
everything that travels (the working tree plus the kit) must stay under 64 MiB. The kit holds:
- wheels/: cp312 manylinux x86_64 wheels of exactly what the check imports and the image lacks
  (needs.txt, at constraints.txt's versions), downloaded with --no-deps; nothing the image has (image.txt);
- smollm2-shape/: SmolLM2-135M's config and tokenizer files, no weights (`gpu-check --model-shape`);
- run.sh: installs the wheels with --no-deps --target, runs the check with its time budgets, and leaves
  gpu.json, the log and the profile summary under $OUT;
- manifest.json: the wheels and the sizes, as checked here.

How to use it: docs/benchmarks.md#the-gpu-check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_kit.image import IMAGE_PACKAGES, normalized, read_requirements

HERE = Path(__file__).parent
REPO = HERE.parent.parent
TRAVEL_LIMIT = 64 * 2**20  # the device tool's limit on the working tree plus everything carried
SHAPE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# pip matches a platform tag exactly: the manylinux levels a CPython 3.12 wheel for x86_64 is built for
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class KitError(Exception):
    """What stops the kit from being built, in one line."""


def needed() -> list[str]:
    """needs.txt's names, in order."""
    return [name for name, _ in read_requirements(HERE / "needs.txt")]


def pinned_versions(names: list[str], constraints: Path = REPO / "constraints.txt") -> dict[str, str]:
    """Each name's version in constraints.txt (what `make setup` installs and the tests run)."""
    pins = {name: version for name, version in read_requirements(constraints) if version}
    missing = [name for name in names if name not in pins]
    if missing:
        raise KitError(f"needs.txt names {', '.join(missing)}, which constraints.txt does not pin: pin it there")
    return {name: pins[name] for name in names}


def check_needs(names: list[str]) -> None:
    """The kit carries no second copy of the image's packages, and each package once."""
    doubled = sorted(name for name in names if name in IMAGE_PACKAGES)
    if doubled:
        raise KitError(f"needs.txt names {', '.join(doubled)}, which the image has (image.txt): remove it")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise KitError(f"needs.txt names {', '.join(repeated)} twice")


def download_wheels(pins: dict[str, str], folder: Path) -> list[Path]:
    """One cp312 manylinux x86_64 (or pure-Python) wheel per pin, no dependencies."""
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [
        sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
        "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
        "--abi", "abi3", "--abi", "none", *platforms, "-d", str(folder),
        *(f"{name}=={version}" for name, version in pins.items()),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise KitError(f"pip could not download the kit's wheels: {done.stderr.strip().splitlines()[-1]}")
    wheels = sorted(folder.glob("*.whl"))
    by_name = {normalized(w.name.split("-")[0]): w for w in wheels}
    stray = sorted(set(by_name) - set(pins))
    if stray or len(wheels) != len(by_name):  # an earlier kit's wheel: two versions would stop the install
        raise KitError(f"{folder} holds wheels not asked for: {', '.join(stray) or 'two of one package'}; delete it")
    return wheels


def copy_model_shape(model_dir: Path, folder: Path) -> Path:
    """The model's config and tokenizer files: what `gpu-check --model-shape` builds random weights from."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHAPE_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, folder / name)
    if not (folder / "config.json").exists():
        raise KitError(f"{model_dir} has no config.json: run `make setup` (it prepares the default model)")
    return folder


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what travels besides the kit: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    files = {repo / name for name in listed.decode().split("\0") if name}
    return sum(f.stat().st_size for f in files if f.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build(out: Path, model_dir: Path) -> dict:
    """Build the kit into `out` (its wheels folder is reused when it holds exactly the pinned wheels)."""
    names = needed()
    check_needs(names)
    pins = pinned_versions(names)
    wheels = download_wheels(pins, out / "wheels")
    copy_model_shape(model_dir, out / "smollm2-shape")
    shutil.copy2(HERE / "run.sh", out / "run.sh")
    kit, tree = folder_bytes(out), tree_bytes()
    manifest = {
        "wheels": {w.name: w.stat().st_size for w in wheels},
        "model_shape": sorted(p.name for p in (out / "smollm2-shape").iterdir()),
        "kit_bytes": kit,
        "tree_bytes": tree,
        "travel_bytes": kit + tree,
        "travel_limit_bytes": TRAVEL_LIMIT,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if kit + tree >= TRAVEL_LIMIT:
        raise KitError(
            f"the working tree ({tree / 2**20:.1f} MiB) and the kit ({kit / 2**20:.1f} MiB) exceed the "
            f"{TRAVEL_LIMIT // 2**20} MiB that travels to a GPU machine: trim needs.txt"
        )
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the GPU kit (docs/benchmarks.md#the-gpu-check).")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-kit")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the prepared smollm2-135m")
    args = parser.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from stages.host_model.smollm2 import prepare_default_model

        model_dir = prepare_default_model()
    try:
        manifest = build(args.out, model_dir)
    except KitError as e:
        sys.exit(f"error: {e}")
    mib = 2**20
    print(f"{args.out}: {len(manifest['wheels'])} wheels, the model shape, run.sh")
    for name, size in manifest["wheels"].items():
        print(f"  {size / mib:6.2f} MiB  {name}")
    print(
        f"kit {manifest['kit_bytes'] / mib:.1f} MiB + working tree {manifest['tree_bytes'] / mib:.1f} MiB = "
        f"{manifest['travel_bytes'] / mib:.1f} MiB of the {TRAVEL_LIMIT // mib} MiB that travel"
    )


if __name__ == "__main__":
    main()
