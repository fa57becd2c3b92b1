"""Every float option is checked where it enters (finite, in range), with the option's name; no JSON artefact
ever holds NaN or infinity."""

import dataclasses
import importlib
import json
import math
import pkgutil
import re

import pytest

import memdistill
from memdistill.checks import require_finite, require_int
from memdistill.cli import main
from memdistill.options import _field_type
from memdistill.errors import UserError
from memdistill.manifest import write_json_atomic

# How a nested config's options are spelled on the command line of run and bench (cli.add_config_args).
NESTED_PREFIX = {"finetune": "", "sample": "sample-", "eval": "eval-", "scores": ""}
BAD = [float("nan"), float("inf"), float("-inf")]


def config_classes() -> list[type]:
    """Every dataclass named *Config with a validate() in the package's top-level modules: a config added
    later is covered without touching this test."""
    found = {}
    for info in pkgutil.iter_modules(memdistill.__path__):
        if info.name == "__main__":  # runs the command line when imported
            continue
        module = importlib.import_module(f"memdistill.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__name__.endswith("Config")
                    and hasattr(obj, "validate")):
                found[obj.__qualname__] = obj
    return list(found.values())


def float_options(cls: type, path: tuple = (), prefix: str = ""):
    """(attribute path, option spelling) of every float field, nested configs included."""
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from float_options(type(value), (*path, f.name), NESTED_PREFIX[f.name])
        elif _field_type(f.type)[0] is float:
            yield (*path, f.name), "--" + prefix + f.name.replace("_", "-")


CASES = [(cls, path, option) for cls in config_classes() for path, option in float_options(cls)]


def test_the_float_options_are_found():
    names = {(cls.__name__, option) for cls, _, option in CASES}
    assert {("TrainConfig", "--lr"), ("TrainConfig", "--epochs"), ("TrainConfig", "--grad-clip"),
            ("SampleConfig", "--cfg-scale"), ("SampleConfig", "--eta"), ("EvalConfig", "--cutmix-beta"),
            ("RunConfig", "--sample-cfg-scale"), ("RunConfig", "--eval-momentum"), ("RunConfig", "--ema-decay"),
            ("BenchConfig", "--eval-lr"), ("BenchConfig", "--lambda-gen")} <= names


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls, path, option", CASES, ids=[f"{c.__name__}:{o}" for c, _, o in CASES])
def test_every_float_option_refuses_non_finite_values(cls, path, option, bad):
    cfg = cls()
    owner = cfg
    for name in path[:-1]:
        owner = getattr(owner, name)
    setattr(owner, path[-1], bad)
    with pytest.raises(UserError) as err:
        cfg.validate()
    assert re.search(rf"(^|\s){re.escape(option)}\b", str(err.value)), str(err.value)


@pytest.mark.parametrize("name", ["lambda_real", "lambda_gen"])
def test_bench_sweep_values_must_be_finite(name):
    from memdistill.bench import BenchConfig

    cfg = BenchConfig(sweep=True, **{f"sweep_{name}": "0,nan"})
    with pytest.raises(UserError, match=f"--sweep-{name.replace('_', '-')}"):
        cfg.validate()


@pytest.mark.parametrize("cls_name, field, value, option", [
    ("train.TrainConfig", "ema_decay", 1.0, "--ema-decay"),
    ("train.TrainConfig", "lr", 1e300, "--lr"),  # float32 optimisers cannot hold it
    ("train.TrainConfig", "epochs", 0.0, "--epochs"),
    ("sample.SampleConfig", "eta", 1.5, "--eta"),  # DDIM's sqrt goes negative: NaN images
    ("sample.SampleConfig", "cfg_scale", -1.0, "--cfg-scale"),
    ("evaluate.EvalConfig", "momentum", 1.0, "--momentum"),
    ("evaluate.EvalConfig", "lr", 0.0, "--lr"),
])
def test_out_of_range_values_are_refused(cls_name, field, value, option):
    module, name = cls_name.split(".")
    cls = getattr(importlib.import_module(f"memdistill.{module}"), name)
    with pytest.raises(UserError, match=re.escape(option)):
        dataclasses.replace(cls(), **{field: value}).validate()


@pytest.mark.parametrize("args, option", [
    (["finetune", "--lr", "inf"], "--lr"),
    (["finetune", "--lr", "nan"], "--lr"),
    (["pretrain", "--grad-clip", "nan"], "--grad-clip"),
    (["sample", "--cfg-scale", "nan"], "--cfg-scale"),
    (["evaluate", "--train", "x", "--lr", "nan"], "--lr"),
    (["run", "--eval-lr", "nan"], "--eval-lr"),
    (["run", "--sample-eta", "inf"], "--sample-eta"),
])
def test_the_command_line_refuses_non_finite_options(capsys, tmp_path, args, option):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_require_helpers():
    require_finite("--x", 0.5, 0, 1)
    require_finite("--x", None, 0, optional=True)
    with pytest.raises(UserError, match=r"--x must be a finite number > 0 and < 1, got 1"):
        require_finite("--x", 1, 0, 1, low_open=True, high_open=True)
    with pytest.raises(UserError, match="--x"):
        require_finite("--x", True)
    require_int("--n", 3, 1)
    with pytest.raises(UserError, match=r"--n must be an integer >= 1, got 0"):
        require_int("--n", 0, 1)


def test_json_artefacts_never_hold_nan(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": 1.0})
    for bad in BAD:
        with pytest.raises(UserError, match=r"non-finite.*results\[0\]\.best_mean"):
            write_json_atomic(path, {"results": [{"best_mean": bad}]})
    assert json.loads(path.read_text()) == {"ok": 1.0}  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left
    assert math.isfinite(json.loads(path.read_text())["ok"])
