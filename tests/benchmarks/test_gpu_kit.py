"""`make gpu-kit`: what travels to a lent GPU machine fits its limit, carries nothing its image has, and
brings weightless model files. (That the kit is complete is proven by `make gpu-kit-proof`, which runs it in
a 5 GB copy of the image: too large for the suite.)"""

import json
import subprocess

import pytest

from benchmarks.gpu_kit import build
from benchmarks.gpu_kit.image import IMAGE_PACKAGES, image_pins, normalized


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """The kit as `make gpu-kit` builds it (its wheels downloaded from the package index)."""
    from stages.host_model.smollm2 import prepare_default_model

    out = tmp_path_factory.mktemp("kit") / ".gpu-kit"
    return out, build.build(out, prepare_default_model())


def test_the_working_tree_and_the_kit_fit_in_what_travels(kit):
    out, manifest = kit
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    # the manifest is written last, so the kit it sums is the kit without it
    assert manifest["kit_bytes"] == on_disk - (out / "manifest.json").stat().st_size
    assert manifest["tree_bytes"] == build.tree_bytes()
    assert manifest["kit_bytes"] + manifest["tree_bytes"] < build.TRAVEL_LIMIT == 64 * 2**20


def test_the_kit_carries_exactly_what_the_image_lacks(kit):
    out, manifest = kit
    carried = [normalized(name.split("-")[0]) for name in manifest["wheels"]]
    assert sorted(carried) == sorted(build.needed())  # one wheel per need, at its pinned version
    assert not set(carried) & IMAGE_PACKAGES
    pins = build.pinned_versions(build.needed())
    assert all(f"-{pins[normalized(name.split('-')[0])]}-" in name for name in manifest["wheels"])


def test_every_wheel_installs_on_the_images_python_and_processor(kit):
    _, manifest = kit
    for name in manifest["wheels"]:
        python, abi, platform = name.removesuffix(".whl").split("-")[-3:]
        assert python in ("py3", "cp312", "py312") or python.startswith("py2.py3"), name
        assert abi in ("none", "abi3", "cp312"), name
        assert platform == "any" or ("manylinux" in platform and platform.endswith("x86_64")), name


def test_the_model_shape_has_config_and_tokenizer_but_no_weights(kit):
    out, manifest = kit
    shape = out / "smollm2-shape"
    assert {"config.json", "tokenizer.json"} <= set(manifest["model_shape"])
    assert json.loads((shape / "config.json").read_text())["num_hidden_layers"] == 30
    assert not [f for f in shape.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")]


def test_the_script_that_runs_there_is_in_the_kit_and_parses(kit):
    out, _ = kit
    assert (out / "run.sh").read_text() == (build.HERE / "run.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "run.sh")]).returncode == 0
    refused = subprocess.run(["bash", str(out / "run.sh"), "--warp"], capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown argument --warp" in refused.stderr


def test_a_need_the_image_already_has_is_refused():
    with pytest.raises(build.KitError, match="needs.txt names numpy, which the image has"):
        build.check_needs(["zarr", "numpy"])


def test_a_need_without_a_pinned_version_is_refused(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# pins\nzarr==3.1.6\n")
    assert build.pinned_versions(["zarr"], constraints) == {"zarr": "3.1.6"}
    with pytest.raises(build.KitError, match="needs.txt names wandb, which constraints.txt does not pin"):
        build.pinned_versions(["zarr", "wandb"], constraints)


def test_a_kit_over_the_limit_is_refused_with_its_sizes(tmp_path, monkeypatch):
    from stages.host_model.smollm2 import prepare_default_model

    monkeypatch.setattr(build, "TRAVEL_LIMIT", 1024)
    monkeypatch.setattr(build, "needed", lambda: ["donfig"])
    with pytest.raises(build.KitError, match=r"the working tree \(.* MiB\) and the kit \(.* MiB\) exceed the 0 MiB"):
        build.build(tmp_path / "kit", prepare_default_model())


def test_the_image_list_pins_the_versions_saepipe_must_run_on():
    pins = image_pins()
    assert pins["torch"] == "2.11.0" and pins["transformers"] == "5.17.0" and pins["numpy"].startswith("2.5")
    assert {"zarr", "transformer-lens", "sae-lens", "wandb", "dask"}.isdisjoint(IMAGE_PACKAGES)
