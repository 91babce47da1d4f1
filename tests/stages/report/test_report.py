"""`saepipe report` and `saepipe compare` as a user sees them: two SAEs trained and evaluated on a tiny
store of the tiny random model, the report rendered in headless Chromium, and the one-line errors."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.helpers.cli import collect_args, expect_error, run, run_ok

WIDTH = 64
CHROMIUM_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two evaluated runs (k=2 and k=4) of one sweep; k=2 without feature_density.npy, as eval wrote
    runs before it saved one."""
    root = tmp_path_factory.mktemp("report")
    store = root / "s.zarr"
    run_ok(*collect_args(3000, eval_fraction=0.2), "--out", store)
    sweep = root / "sweep"
    result = run(
        "train",
        store,
        "--width",
        WIDTH,
        "--tokens",
        "6000",
        "--batch-size",
        "512",
        "--log-every",
        "2",
        "--out",
        sweep,
        "--sweep",
        "k=2,4",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    folders = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["k=2", "k=4"]
    for folder in folders:
        result = run("eval", folder, "--no-progress", "--device", "cpu")
        assert result.exit_code == 0, result.output
    (folders[0] / "feature_density.npy").unlink(missing_ok=True)
    return root, folders


@pytest.fixture(scope="module")
def report(runs):
    root, folders = runs
    out = root / "report"
    started = time.perf_counter()
    result = run(
        "report",
        *folders,
        "--out",
        out,
        "--top",
        3,
        "--random",
        3,
        "--latents",
        5,
        "--contexts",
        4,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "report written" in result.output
    print(f"report on the tiny runs took {time.perf_counter() - started:.1f} s")
    return out


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True, timeout=600
        )
        found = shutil.which("chromium")
    if found is None:
        message = "headless Chromium is needed to render the report (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def headless(browser: str, page, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",
            "--v=0",
            *args,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
    )


def test_report_renders_in_chromium(report, tmp_path):
    browser = chromium()
    page = report / "index.html"
    dom = headless(browser, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the page writes nothing to the console, so any console line is an error or a warning
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    check = re.search(r'<body[^>]*data-check="([^"]*)"', dom.stdout)
    assert check is not None, "the page's check script did not run"
    assert check.group(1) == "ok", check.group(1)

    shot = tmp_path / "report.png"
    result = headless(browser, page, f"--screenshot={shot}", "--window-size=1280,2400")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_self_contained_with_png_files(report, runs):
    _, folders = runs
    text = (report / "index.html").read_text()
    assert not re.findall(r'(?:src|href)\s*=\s*"(?!data:image/png;base64,|#)', text)
    assert "http://" not in text and "https://" not in text
    images = re.findall(r'<img src="data:image/png;base64,', text)
    for name in (
        "training_curves.png",
        "frontier_l0_fve.png",
        "frontier_l0_ce_recovered.png",
        "density_k=2.png",
        "density_k=4.png",
        "latents/k=2_latent_5.png",
        "latents/k=4_latent_5.png",
    ):
        assert (report / name).stat().st_size > 1000, name
    latent_pngs = list((report / "latents").glob("*.png"))
    assert len(images) == 3 + 2 + len(latent_pngs)  # training, two frontiers, densities, latent histograms
    for folder in folders:  # the named latent, with its contexts, in each run's browser
        anchor = re.escape(f'<section class="latent" id="{folder.name}-latent-5">')
        section = re.search(anchor + "(.*?)</section>", text, re.S)
        assert section and "named" in section.group(1)
    assert text.count('class="context"') >= 2
    assert "promoted tokens" in text  # the model's unembedding was used
    assert "firing fractions are from the" in text  # k=2 has no feature_density.npy
    for key in ("fve", "ce_recovered", "dead_fraction", "l0"):
        assert f"<td>{key}</td>" in text


def test_compare_prints_every_run(runs):
    _, folders = runs
    result = run("compare", *folders)
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert "k=2" in header and "k=4" in header
    for key in ("fve", "l0", "ce_recovered", "dead_fraction"):
        assert re.search(rf"^{key}\s", result.output, re.M), key
    result = run("compare", *folders, "--json")
    rows = json.loads(result.output)
    assert [row["label"] for row in rows] == ["k=2", "k=4"]
    assert rows[0]["k"] == 2 and rows[1]["k"] == 4 and all(0 < row["fve"] <= 1 for row in rows)


def test_a_run_without_eval_json_is_refused(runs, tmp_path):
    _, folders = runs
    unevaluated = tmp_path / "unevaluated"
    shutil.copytree(folders[1], unevaluated)
    (unevaluated / "eval.json").unlink()
    for command in ("report", "compare"):
        extra = ["--out", tmp_path / "r"] if command == "report" else []
        expect_error(
            run(command, folders[0], unevaluated, *extra),
            f"{unevaluated} has no eval.json",
            f"saepipe eval {unevaluated}",
        )
    assert not (tmp_path / "r").exists()


def test_latent_out_of_range_is_refused(runs, tmp_path):
    _, folders = runs
    expect_error(
        run("report", folders[0], "--latents", f"3,{WIDTH}", "--out", tmp_path / "r"),
        f"--latents {WIDTH} is out of range",
        f"0 to {WIDTH - 1}",
    )
    expect_error(run("report", folders[0], "--latents", "3,x", "--out", tmp_path / "r"), "--latents must be")


def test_a_run_whose_latents_never_fire_is_reported_with_an_empty_browser(runs, tmp_path):
    """A JumpReLU whose thresholds start far above every activation has no latent that fires: the
    report says so, where it once indexed the decoder with an empty float tensor (IndexError)."""
    root, _ = runs
    silent = tmp_path / "silent"
    train = ["--arch", "jumprelu", "--init-threshold", "1000000", "--width", WIDTH, "--tokens", "2048"]
    run_ok("train", root / "s.zarr", *train, "--batch-size", "512", "--no-progress", "--device", "cpu", "--out", silent)
    run_ok("eval", silent, "--no-progress", "--device", "cpu")
    record = json.loads((silent / "eval.json").read_text())
    assert record["l0"] == 0 and record["ablation_sparsity"] is None  # null, not NaN: no ablation moved a logit
    out = tmp_path / "report"
    run_ok("report", silent, "--out", out, "--device", "cpu", "--no-progress")
    assert "no latent fired on the" in (out / "index.html").read_text()


def test_sparse_codes_are_read_without_densifying_them_the_same_as_dense():
    import torch

    from stages.report.latents import _selected
    from stages.saes.base import DenseCode, SparseCode

    generator = torch.Generator().manual_seed(0)
    code = SparseCode(torch.rand(50, 4, generator=generator), torch.randperm(32, generator=generator)[:4].repeat(50, 1))
    latents = torch.tensor([3, int(code.indices[0, 0]), 30])
    column = torch.full((32,), -1)
    column[latents] = torch.arange(3)
    expected = code.dense(32)[:, latents]
    assert torch.equal(_selected(code, latents, column, 32), expected)
    assert torch.equal(_selected(DenseCode(code.dense(32)), latents, column, 32), expected)


PWN = "document.body.appendChild(Object.assign(document.createElement('div'),{id:'pwned'}))"
HOSTILE_TEXT = f'<script>{PWN}</script> and "><img src=x onerror="{PWN}"> '


def test_hostile_tokens_and_run_names_render_as_text(tmp_path):
    """A report of a store whose text holds markup, from a run folder whose name holds markup: in
    Chromium no injected script runs (it would add <div id="pwned">) and nothing reaches the console."""
    browser = chromium()
    text = tmp_path / "hostile.txt"
    text.write_text(HOSTILE_TEXT * 400)
    store = tmp_path / "s.zarr"
    run_ok(*collect_args(3000, eval_fraction=0.2), "--dataset", text, "--out", store)
    run_folder = tmp_path / f'run"><img src=x onerror={PWN}>'
    train = ["--width", WIDTH, "--k", "4", "--tokens", "6000", "--batch-size", "512", "--no-progress"]
    run_ok("train", store, *train, "--device", "cpu", "--out", run_folder)
    run_ok("eval", run_folder, "--no-progress", "--device", "cpu")
    out = tmp_path / "report"
    run_ok("report", run_folder, "--out", out, "--latents", 5, "--contexts", 4, "--device", "cpu", "--no-progress")
    page = (out / "index.html").read_text()
    assert "<img src=x" not in page and page.count("<script") == 1  # escaped: only the page's own check script
    dom = headless(browser, out / "index.html", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<div id="pwned">' not in dom.stdout  # no injected script ran
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    check = re.search(r'<body[^>]*data-check="([^"]*)"', dom.stdout)
    assert check is not None and check.group(1) == "ok"
