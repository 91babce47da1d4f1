"""The CLI is built from the configs' settings (one source): every setting is an option of its command,
named by its flag, with the setting's default and help; the commands have no other options but the
few that configure no stage. And the values given on the command line reach the configs."""

import click
import pytest
from click.testing import CliRunner

from benchmarks.bench import BenchConfig
from benchmarks.cli import main as harnesses
from benchmarks.quality import QualityConfig
from benchmarks.soak import SoakConfig
from pipeline.cli import main
from stages.basics.settings import default_of, flag_of, settings_of
from stages.collect import CollectConfig
from stages.evaluate import EvalConfig
from stages.evaluate.transcoder_set import EvalSetConfig
from stages.report.build import ReportOptions
from stages.report.latents import BrowseOptions
from stages.saes import ARCHITECTURES, arch_settings, owners
from stages.train import TrainConfig

# The one option whose help the CLI words itself: quality's --out holds several runs, not one.
OWN_HELP = {("quality", "out")}
QUALITY_TRAIN_SETTINGS = ("hook", "width", "tokens", "batch_size", "lr", "out", "device", "seed", "progress")
# command -> the configs whose settings it exposes (all of them, or the named ones), and its other options
COMMANDS = {
    "collect": ([(CollectConfig, None)], {"append_to"}),
    "train": (
        [(TrainConfig, None)] + [(sae.settings_class, None) for sae in ARCHITECTURES.values()],
        {"sweep_specs", "nproc"},
    ),
    "eval": ([(EvalConfig, None)], set()),
    "eval-set": ([(EvalSetConfig, None)], set()),
    "report": ([(ReportOptions, None), (BrowseOptions, None)], set()),
    "quality": ([(QualityConfig, None), (TrainConfig, QUALITY_TRAIN_SETTINGS)], set()),
    "bench": ([(BenchConfig, None)], set()),
    "soak": ([(SoakConfig, None)], set()),
}


def cli_default(field):
    """A setting's default as its option holds it (a tuple of integers is given comma-separated)."""
    default = default_of(field)
    if str(field.type).replace(" ", "").removesuffix("|None") == "tuple[int,...]":
        return None if default in (None, ()) else ",".join(map(str, default))
    return default


@pytest.mark.parametrize("name", COMMANDS)
def test_every_setting_is_an_option_with_its_flag_default_and_help(name):
    configs, cli_only = COMMANDS[name]
    command = main.commands.get(name) or harnesses.commands[name]  # saepipe's, or `python -m benchmarks`'s
    options = {p.name: p for p in command.params if isinstance(p, click.Option) and p.name != "help"}
    exposed = set()
    for cls, names in configs:
        for field_name, field in settings_of(cls).items():
            if names is not None and field_name not in names:
                continue
            exposed.add(field_name)
            option = options.get(field_name)
            assert option is not None, f"{name}: setting {cls.__name__}.{field_name} has no option"
            assert option.opts[0] == flag_of(field)
            assert (name, field_name) in OWN_HELP or option.help.startswith(field.metadata["help"]), field_name
            default = option.default if not option.multiple else tuple(option.default)
            if option.multiple and default == () and cli_default(field) is None:
                continue  # train's --hook, repeated for a crosscoder: none given is the field's None
            assert default == cli_default(field) or option.required, (name, field_name, option.default)
    assert set(options) == exposed | cli_only, f"{name}: options that no setting declares"


def test_each_architecture_option_names_the_architectures_taking_it():
    train = {p.name: p for p in main.commands["train"].params}
    for name in arch_settings():
        assert train[name].help.endswith(f"(--arch {', '.join(owners(name))})")
    assert owners("k") == ["topk", "batchtopk", "matryoshka", "mp"] and owners("l1_coef") == ["relu"]


def test_command_line_values_reach_the_config(monkeypatch):
    seen = {}
    monkeypatch.setattr("pipeline.commands.collect.run_collect", lambda cfg: seen.setdefault("collect", cfg))
    monkeypatch.setattr("pipeline.commands.train.run_sweep", lambda cfgs, nproc: seen.setdefault("train", cfgs) or [])
    args = [
        "collect",
        "--out",
        "s.zarr",
        "--hook",
        "a",
        "--hook",
        "b",
        "--keep-special",
        "--outlier-factor",
        "0",
        "--split",
        "test",
        "--no-progress",
        "--workers",
        "2",
    ]
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    cfg = seen["collect"]
    assert cfg.hooks == ("a", "b") and cfg.exclude_special is False and cfg.outlier_factor is None
    assert cfg.dataset_split == "test" and cfg.progress is False and cfg.workers == 2 and cfg.tokens == 100_000
    args = [
        "train",
        "s.zarr",
        "--out",
        "run",
        "--arch",
        "matryoshka",
        "--groups",
        "8,32,64",
        "--width",
        "64",
        "--k",
        "4",
        "--dead-window",
        "1000",
    ]
    CliRunner().invoke(main, args, catch_exceptions=False)
    (cfg,) = seen["train"]
    assert cfg.settings.groups == (8, 32, 64) and cfg.settings.k == 4 and cfg.dead_window_tokens == 1000
    assert cfg.to_json()["groups"] == (8, 32, 64) and cfg.to_json()["l1_coef"] is None and cfg.progress is True
