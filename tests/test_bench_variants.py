"""Bench method variants METHOD+LEVER[:ARGS]: the parser, its messages, and +select sharing one pool."""

import json

import pytest

from memdistill.bench import cells
from memdistill.bench.config import BenchConfig, LEVERS, method_label, parse_method
from memdistill.errors import UserError
from memdistill.imageset import read_image_set

from test_bench import TINY, bench_cli


def test_variants_parse_and_are_labelled():
    v = parse_method("adaptive+select:confident")
    assert (v.base, v.levers) == ("adaptive", {"select": {"rule": "confident", "pool": 4.0}})
    v = parse_method("dit+select:kcenter:2.5")
    assert (v.base, v.levers, v.slug()) == ("dit", {"select": {"rule": "kcenter", "pool": 2.5}}, "dit+select-kcenter-2.5")
    assert method_label("dit+select:kcenter:2.5") == "DiT + select kcenter (pool 2.5x)"
    assert method_label("minimax") == "Minimax" and parse_method("minimax").levers == {}
    assert BenchConfig(methods="dit,dit+select:random,adaptive+select:herding:3").base_methods() == ["dit", "adaptive"]
    assert set(LEVERS) >= {"select"}  # the one registry a new lever is added to


@pytest.mark.parametrize("text, message", [
    ("gan+select:random", "unknown method 'gan' in --method; allowed: random, herding, dit"),
    ("random+select:confident", "levers change how a model is sampled; random selects real images"),
    ("dit+pick:random", "unknown lever 'pick'; allowed: +select:RULE[:F]"),
    ("dit+select", "+select takes a rule and optionally a pool factor"),
    ("dit+select:best", "+select: unknown rule 'best'; allowed: random, herding, prototype, kcenter, confident, difficulty"),
    ("dit+select:random:0.5", "the pool factor F must be a number >= 1, got '0.5'"),
    ("dit+select:random:x", "the pool factor F must be a number >= 1, got 'x'"),
    ("dit+select:random:2:3", "+select takes a rule and optionally a pool factor"),
    ("dit+select:random+select:kcenter", "the lever +select is given twice"),
])
def test_bad_variants_are_refused_with_what_is_allowed(text, message):
    with pytest.raises(UserError) as err:
        BenchConfig(methods=f"random,{text}").validate()
    assert message in str(err.value) and "--method" in str(err.value)


def test_select_variants_share_one_pool_across_rules(tiny_model, tmp_path, monkeypatch, capsys):
    drawn = []
    real_draw = cells._Bench.draw

    def draw(self, method, model, ipc, folder):
        drawn.append((method, ipc, folder.name))
        return real_draw(self, method, model, ipc, folder)

    monkeypatch.setattr(cells._Bench, "draw", draw)
    out = tmp_path / "bench"
    bench_cli("--init", tiny_model, *TINY, "--method", "dit,dit+select:random:2,dit+select:kcenter:2", "--ipc", "1,2",
              "--no-metrics", "--sample-judge-data", "digits", "--sample-judge-net", "convnet1",
              "--sample-judge-epochs", "1", "--out", out)
    # one pool of ceil(2 x 2) = 4 candidates per class, sampled once for both rules and both IPCs
    assert drawn.count(("dit", 4, "pool-dit-x2-n4")) == 1 and [d for d in drawn if d[0] != "dit" or d[1] != 2] == [
        ("dit", 4, "pool-dit-x2-n4")]
    assert "| IPC | net | DiT | DiT + select random (pool 2x) | DiT + select kcenter (pool 2x) |" in capsys.readouterr().out
    for k in (1, 2):
        for rule in ("random", "kcenter"):
            _, y, _, m = read_image_set(out / "sets" / f"dit+select-{rule}-2-ipc{k}")
            sel = m["selection"]
            assert m["ipc"] == k and sel["rule"] == rule and sel["pool_size"] == 2 * k
            assert all(len(kept) == k and max(kept) < 2 * k for kept in sel["kept"])
            assert (out / "cells" / f"dit+select-{rule}-2-ipc{k}-convnet1.json").is_file()
    assert json.loads((out / "bench.json").read_text())["methods"][1] == "dit+select:random:2"
    assert "Select variants sample a pool" in (out / "bench.md").read_text()


def test_guidance_levers_parse_into_sample_overrides():
    v = parse_method("dit+cfgint:200-800+select:confident:2")
    assert v.sampled() == "dit+cfgint:200-800" and v.sample_overrides() == {"cfg_interval": "200,800"}
    assert method_label(v.name) == "DiT + CFG in [200,800) + select confident (pool 2x)"
    v = parse_method("minimax+modes:0.3:0.5:4+cfgsched:cosine")
    assert v.sample_overrides() == {"mode_guidance": 0.3, "mode_stop": 0.5, "modes": 4, "cfg_schedule": "cosine"}
    assert method_label(v.name) == "Minimax + modes 0.3 until 0.5 k=4 + CFG cosine"
    assert parse_method("dit+cfg:2").sample_overrides() == {"cfg_scale": 2.0}
    for bad in ("dit+cfgint:800-200", "dit+modes:x", "dit+cfg:-1", "dit+cfgsched:wavy"):
        with pytest.raises(UserError, match="--method"):
            BenchConfig(methods=bad).validate()


def test_guidance_variants_sample_with_their_settings(tiny_model, tmp_path):
    out = tmp_path / "bench"
    bench_cli("--init", tiny_model, *TINY, "--method", "dit,dit+cfgint:0-1000,dit+cfg:1", "--ipc", "1",
              "--no-metrics", "--out", out)
    plain, window, unguided = (read_image_set(out / "sets" / f"{name}-ipc1")
                               for name in ("dit", "dit+cfgint-0-1000", "dit+cfg-1"))
    assert window[3]["config"]["cfg_interval"] and unguided[3]["config"]["cfg_scale"] == 1.0
    # a window over every timestep is plain guidance, image for image
    assert (window[0] == plain[0]).all()
    assert not (unguided[0] == plain[0]).all()


def test_help_and_readme_list_every_lever():
    """--method's help is generated from the LEVERS registry; the README's bench section names each lever too."""
    from pathlib import Path

    from memdistill.bench.command import BENCH_HELP

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for lever in LEVERS.values():
        assert f"+{lever.syntax}" in BENCH_HELP["methods"] and lever.doc in BENCH_HELP["methods"]
        assert f"`+{lever.syntax}`" in readme


@pytest.mark.parametrize("methods", ["dit,dit+cfgint:200,800", "dit+cfgint:200,800,adaptive+cfgint:200,800",
                                     "dit+cfgint:200"])
def test_sample_s_comma_interval_in_method_says_to_write_a_dash(methods):
    with pytest.raises(UserError) as err:
        BenchConfig(methods=methods).validate()
    assert "--method" in str(err.value) and "200-800" in str(err.value), str(err.value)


def test_mode_guidance_takes_its_modes_from_the_bench_data(tiny_model, tmp_path):
    # The tiny export records no training data: before, the modes had no default and the bench stopped
    # (a shipped model's modes came from its own set, whatever --data said).
    out = tmp_path / "bench"
    bench_cli("--init", tiny_model, *TINY, "--method", "dit+modes:0.3", "--ipc", "1", "--no-metrics", "--out", out)
    manifest = read_image_set(out / "sets" / "dit+modes-0.3-ipc1")[3]
    assert manifest["config"]["mode_data"] == "digits"
