"""`memdistill finetune` on a tiny setting (a micro DiT on the 8x8 digits): the artefacts of a run, the
memories and the per-step loss against known answers, and the bad-input contract of the real CLI."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memdistill.cli import main
from memdistill.errors import UserError
from memdistill.losses import cosine_matrix, memory_loss
from memdistill.memory import ClassMemories, naive_adaptive_keep
from memdistill.models.dit import build_dit, set_trainable
from memdistill.models.io import load_dit, load_export, save_export
from memdistill.train import TrainConfig, batch_indices, load_train_data

from conftest import DIGITS

SRC = Path(__file__).resolve().parents[1] / "src"
LAMBDA_REAL, LAMBDA_GEN = 0.002, 0.008  # the defaults, which the runs below keep


def make_init(folder: Path, num_classes: int = 10, input_size: int = 8) -> Path:
    """A 'pretrained' micro DiT: build_dit's init (zeroed output layers) plus small noise."""
    torch.manual_seed(0)
    model = build_dit("DiT-Micro/2", input_size=input_size, in_channels=1, num_classes=num_classes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape) * 0.05)
    names = [str(i) for i in range(num_classes)]
    return save_export(folder, model, {"stage": "pretrain", "class_names": names, "cond_labels": list(range(num_classes)),
                                       "codec": {"name": "pixel"}, "image_shape": [1, input_size, input_size],
                                       "latent_shape": [1, input_size, input_size]})


def finetune(init, out, *args) -> int:
    return main(["finetune", "--data", "digits", "--init", str(init), "--out", str(out), "--batch-size", "8",
                 "--device", "cpu", "--no-progress", *map(str, args)])


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def last_state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def digits():
    """The training latents (pixel codec: the images) and labels the runs draw their batches from."""
    data = load_train_data(TrainConfig(data="digits", device="cpu"))
    assert not data.posterior.flips and data.posterior.logvar is None  # digits: no flips; pixels: no posterior
    return data.posterior.mean[:, 0], data.targets


def class_streams(digits, steps: int, seed: int = 0) -> list[dict[int, torch.Tensor]]:
    """Per step, the clean latents of each class in that step's batch, in batch order."""
    latents, targets = digits
    out = []
    for step in range(steps):
        idx = batch_indices(len(targets), 8, seed, step)
        out.append({c: latents[idx][targets[idx] == c] for c in torch.unique(targets[idx]).tolist()})
    return out


# ----- a short run and its artefacts --------------------------------------------------------------------
@pytest.fixture(scope="module")
def adaptive_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "adaptive"
    code = finetune(tiny_model, out, "--steps", 12, "--memory", "adaptive", "--mem-real", 3, "--mem-gen", 2,
                    "--log-every", 1, "--checkpoint-every", 5, "--ema-decay", 0.9)
    assert code == 0
    return out


def test_run_writes_metrics_config_manifest_checkpoint_export(adaptive_run, tiny_model):
    out = adaptive_run
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "finetune" and config["memory"] == "adaptive" and config["train"] == "difffit"
    assert (config["steps"], config["mem_real"], config["mem_gen"]) == (12, 3, 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "finetune" and manifest["export"] == "export" and manifest["config"] == config

    metrics = rows(out)
    assert [r["step"] for r in metrics] == list(range(1, 13))
    for r in metrics:
        assert {"loss", "diffusion", "mse", "vb", "real", "gen", "memory", "classes", "memory_sizes", "step_time"} <= set(r)
        assert r["step_time"] > 0 and r["loss"] == pytest.approx(r["diffusion"] + r["memory"], rel=1e-6)
        assert r["diffusion"] == pytest.approx(r["mse"] + r["vb"], rel=1e-5)
    assert metrics[0]["memory"] == 0.0 and metrics[0]["classes"] == 0  # memories start empty
    assert any(r["memory"] > 0 for r in metrics)

    state = last_state(out)
    assert {"model", "ema", "opt", "memories", "step", "rng", "config"} <= set(state)
    assert state["step"] == 12 and state["config"] == config
    assert state["memories"]["strategy"] == "adaptive"

    # The export holds the EMA weights of the last step; they moved away from the init, but only in
    # the DiffFit parameters: frozen weights are the init's, bit for bit.
    model, export_cfg = load_export(out / "export")
    assert export_cfg["stage"] == "finetune" and export_cfg["memory"] == "adaptive"
    assert export_cfg["class_names"] == DIGITS and export_cfg["latent_shape"] == [1, 8, 8]
    assert export_cfg["model"]["difffit"] is True
    exported = model.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in state["ema"].items())
    init = load_dit(tiny_model).state_dict()
    assert not torch.equal(exported["y_embedder.embedding_table.weight"], init["y_embedder.embedding_table.weight"])
    assert not torch.equal(exported["blocks.0.difffit_attn"], torch.ones(64))
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    assert torch.equal(exported["blocks.1.mlp.fc1.weight"], init["blocks.1.mlp.fc1.weight"])
    assert "blocks.1.mlp.fc1.weight" not in state["model"]  # the resume state leaves frozen weights to --init

    # Exactly the DiffFit parameters were optimised.
    trained = sum(s["exp_avg"].numel() for s in state["opt"]["state"].values())
    assert trained == set_trainable(load_dit(tiny_model), "difffit")


def test_memory_sizes_and_real_memory_follow_the_batches(adaptive_run, digits):
    """Sizes are min(capacity, latents seen) per class; the real memory is the naive adaptive rule
    applied to the real latents batch after batch (it does not depend on the model)."""
    streams = class_streams(digits, 12)
    seen = {c: 0 for c in range(10)}
    real = {c: torch.empty(0, 1, 8, 8) for c in range(10)}
    for r, batch in zip(rows(adaptive_run), streams):
        for c, z in batch.items():
            seen[c] += len(z)
            merged = torch.cat([real[c], z])
            real[c] = merged[naive_adaptive_keep(merged, 3)]
        assert r["memory_sizes"] == {str(c): {"real": min(3, seen[c]), "gen": min(2, seen[c])} for c in range(10)}
    assert max(seen.values()) > 3  # evictions happened
    saved = last_state(adaptive_run)["memories"]
    for c in range(10):
        if seen[c]:
            assert torch.equal(saved["real"][c]["entries"], real[c]), c
            assert saved["gen"][c]["entries"].shape == (min(2, seen[c]), 1, 8, 8)


def test_logged_memory_term_counts_each_class_once(adaptive_run, digits):
    """memory = (1/|C_B|) sum_c (lr L_real^c + lg L_gen^c) = classes / |C_B| * (lr real + lg gen), with
    real and gen the logged means over the contributing classes (every one has both memories)."""
    _, targets = digits
    seen: set[int] = set()
    multi = 0
    for step, r in enumerate(rows(adaptive_run)):
        batch = set(targets[batch_indices(len(targets), 8, 0, step)].tolist())
        contributing = batch & seen
        assert r["classes"] == len(contributing)
        expected = len(contributing) / len(batch) * (LAMBDA_REAL * r["real"] + LAMBDA_GEN * r["gen"])
        assert r["memory"] == pytest.approx(expected, rel=1e-5, abs=1e-12), step
        multi += len(contributing) > 1
        seen |= batch
    assert multi >= 5  # several classes per step: a class counted twice would show


@pytest.mark.parametrize("strategy", ["adaptive", "fifo"])
@pytest.mark.parametrize("defect", [False, True])
def test_memory_loss_matches_the_per_class_formula_as_memories_change(strategy, defect):
    """memory_loss (batched, cached memory rows) against the formula written out per class with
    cosine_matrix on the memories' current entries, over a stream of updates with evictions."""
    g = torch.Generator().manual_seed(3)
    mem = ClassMemories(4, 3, 2, strategy)
    for step in range(25):
        labels = torch.randint(0, 4, (6,), generator=g)
        pred = torch.randn(6, 2, 3, 3, generator=g, requires_grad=True)
        total, parts = memory_loss(pred, labels, mem, LAMBDA_REAL, LAMBDA_GEN, repeat_defect=defect)
        ref_pred = pred.detach().clone().requires_grad_(True)
        terms = []
        for c in torch.unique(labels).tolist():
            if len(mem.gen(c)):
                p = ref_pred[labels == c]
                t = LAMBDA_GEN * cosine_matrix(p, mem.gen(c).tensor()).max()
                t = t + LAMBDA_REAL * (1 - cosine_matrix(p, mem.real(c).tensor()).min())
                terms.append(t)
        m = len(terms)
        weights = [m - j if defect else 1 for j in range(m)]  # the defect counts the j-th class m - j times
        ref = sum((w * t for w, t in zip(weights, terms)), torch.zeros(())) / len(torch.unique(labels))
        assert parts["classes"] == m
        assert total.item() == pytest.approx(ref.item(), abs=1e-7)
        if m:
            total.backward()
            ref.backward()
            assert torch.allclose(pred.grad, ref_pred.grad, atol=1e-7), step
        mem.update(labels, torch.randn(6, 2, 3, 3, generator=g), pred.detach())


def test_fifo_keeps_the_latest_latents(tiny_model, tmp_path, digits):
    out = tmp_path / "fifo"
    assert finetune(tiny_model, out, "--steps", 10, "--memory", "fifo", "--mem-real", 2, "--mem-gen", 3,
                    "--log-every", 5) == 0
    history = {c: [] for c in range(10)}
    for batch in class_streams(digits, 10):
        for c, z in batch.items():
            history[c].extend(z)
    saved = last_state(out)["memories"]
    assert saved["strategy"] == "fifo"
    assert rows(out)[-1]["memory_sizes"] == {str(c): {"real": min(2, len(h)), "gen": min(3, len(h))}
                                             for c, h in history.items()}
    for c, h in history.items():
        if h:
            assert torch.equal(saved["real"][c]["entries"], torch.stack(h[-2:])), c


def test_memory_none_has_no_memory_terms(tiny_model, tmp_path, adaptive_run):
    out = tmp_path / "none"
    assert finetune(tiny_model, out, "--steps", 3, "--memory", "none", "--log-every", 1, "--ema-decay", 0.9) == 0
    metrics = rows(out)
    assert len(metrics) == 3
    for r in metrics:
        assert not {"memory", "real", "gen", "classes", "memory_sizes"} & set(r)
        assert r["loss"] == r["diffusion"]
    assert last_state(out)["memories"] is None
    # Same seed, and step 1 has no memory term in either run: the same first step.
    assert metrics[0]["diffusion"] == rows(adaptive_run)[0]["diffusion"]


def test_memory_max_t_keeps_late_timesteps_out_of_the_memories(tiny_model, tmp_path, digits):
    """With --memory-max-t T only the samples drawn at t < T enter the memories (and the losses): the
    memory sizes count exactly those samples, step by step."""
    from memdistill.diffusion import GaussianDiffusion
    from memdistill.train import step_generator

    out = tmp_path / "late"
    assert finetune(tiny_model, out, "--steps", 8, "--memory", "fifo", "--mem-real", 50, "--mem-gen", 50,
                    "--memory-max-t", 400, "--log-every", 1) == 0
    _, targets = digits
    diffusion = GaussianDiffusion()
    kept = {c: 0 for c in range(10)}
    dropped = 0
    for step, r in enumerate(rows(out)):
        labels = targets[batch_indices(len(targets), 8, 0, step)]
        t = diffusion.sample_timesteps(8, generator=step_generator(0, step))  # the loop's first draw
        for c in labels[t < 400].tolist():
            kept[c] += 1
        dropped += int((t >= 400).sum())
        assert r["memory_sizes"] == {str(c): {"real": kept[c], "gen": kept[c]} for c in range(10)}, step
    assert 0 < dropped < 64 and sum(kept.values()) > 0  # the filter did remove some samples, not all
    assert json.loads((out / "config.json").read_text())["memory_max_t"] == 400


def test_memory_max_t_with_batches_that_keep_nothing(tiny_model, tmp_path):
    """With T = 1 almost every batch keeps no sample: those steps add no memory term and leave memories alone."""
    out = tmp_path / "none-kept"
    assert finetune(tiny_model, out, "--steps", 3, "--memory", "adaptive", "--memory-max-t", 1, "--log-every", 1) == 0
    for r in rows(out):
        assert r["memory"] == 0.0 and r["classes"] == 0 and r["loss"] == r["diffusion"]
        assert all(size == {"real": 0, "gen": 0} for size in r["memory_sizes"].values())


def test_train_all_trains_every_weight(tiny_model, tmp_path):
    out = tmp_path / "all"
    assert finetune(tiny_model, out, "--steps", 2, "--memory", "none", "--train", "all") == 0
    state = last_state(out)
    init = load_dit(tiny_model)
    expected = sum(p.numel() for name, p in init.named_parameters() if name != "pos_embed")
    assert set_trainable(init, "all") == expected
    assert sum(s["exp_avg"].numel() for s in state["opt"]["state"].values()) == expected
    assert expected > set_trainable(load_dit(tiny_model), "difffit")
    assert not torch.equal(state["model"]["blocks.0.attn.qkv.weight"], init.state_dict()["blocks.0.attn.qkv.weight"])
    assert load_export(out / "export")[1]["model"]["difffit"] is False


# ----- bad input: exit code 2, one line on stderr --------------------------------------------------------
def fails_with(capsys, init, out, *args, match: str) -> str:
    code = finetune(init, out, *args)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(err) == 1 and err[0].startswith("memdistill finetune: error: ") and match in err[0], err
    assert "exported" not in captured.out
    return err[0]


@pytest.mark.parametrize("args, match", [
    (["--lambda-real", "-1"], "--lambda-real must be a finite number >= 0"),
    (["--mem-gen", "0"], "--mem-gen must be an integer >= 1"),
    (["--memory", "lru"], "--memory must be one of adaptive, fifo, none"),
    (["--train", "lora"], "--train must be one of difffit, all"),
    (["--memory-max-t", "0"], "--memory-max-t must be an integer >= 1 and <= 1000"),
])
def test_bad_option_values(capsys, tiny_model, tmp_path, args, match):
    fails_with(capsys, tiny_model, tmp_path / "r", *args, match=match)
    assert not (tmp_path / "r").exists()


def test_init_without_enough_classes(capsys, tmp_path):
    init = make_init(tmp_path / "init5", num_classes=5)
    line = fails_with(capsys, init, tmp_path / "r", "--steps", 2, match="has 5 classes")
    assert "need 10" in line
    assert not (tmp_path / "r").exists()


def test_init_with_another_latent_shape(capsys, tmp_path):
    init = make_init(tmp_path / "init16", input_size=16)
    fails_with(capsys, init, tmp_path / "r", "--steps", 2, match="(1, 8, 8) but the model")
    assert not (tmp_path / "r").exists()


def test_output_folder_of_another_run_and_changed_resume(capsys, tiny_model, tmp_path):
    out = tmp_path / "r"
    assert finetune(tiny_model, out, "--steps", 2, "--memory", "fifo") == 0
    capsys.readouterr()
    before = (out / "checkpoints" / "last.pt").read_bytes()
    fails_with(capsys, tiny_model, out, "--steps", 2, "--memory", "fifo", match="already holds a run")
    line = fails_with(capsys, tiny_model, out, "--steps", 4, "--memory", "fifo", "--lambda-gen", 0.01, "--resume",
                      match="changed settings")
    assert "lambda_gen: 0.008 -> 0.01" in line and "steps" not in line  # more steps is an allowed change
    assert (out / "checkpoints" / "last.pt").read_bytes() == before  # the run was left alone


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def test_real_console_script_exit_code_and_single_error_line(tmp_path):
    """Through a fresh interpreter, as a user runs it: no traceback, one error line (besides log lines)."""
    init = make_init(tmp_path / "init5", num_classes=5)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "memdistill", "finetune", "--data", "digits", "--init", str(init),
                           "--out", str(tmp_path / "r"), "--no-progress"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("memdistill finetune: error: the model") and "5 classes" in lines[0]


def _grey_folder(root: Path, names: list[str]) -> Path:
    from PIL import Image

    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 30 * k + i).save(root / name / f"{i}.png")
    return root


def test_finetune_label_mapping_is_explicit_and_recorded(tmp_path, capsys):
    """Issue 9.6: a 1000-class model and non-wnid folders (or one typo among wnids) is an error naming the
    name; --labels index forces 0..K-1, which is printed and recorded in the manifest and the export."""
    init = make_init(tmp_path / "init", num_classes=1000)
    data = _grey_folder(tmp_path / "pets", ["cat", "dog"])
    args = ["finetune", "--data", str(data), "--init", str(init), "--batch-size", "4", "--steps", "1",
            "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "1000 (ImageNet) classes" in err and "'cat'" in err and "--labels index" in err
    assert not (tmp_path / "a").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--labels", "index"]) == 0
    assert "class labels (index): cat->0, dog->1" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["labels"] == "index" and manifest["cond_labels"] == [0, 1]
    assert load_export(tmp_path / "b" / "export")[1]["labels"] == "index"

    woof = _grey_folder(tmp_path / "woof", ["n02086240", "n02099601", "n02115641", "n0209960l"])
    assert main(["finetune", "--data", str(woof), "--init", str(init), "--out", str(tmp_path / "c"),
                 "--steps", "1", "--device", "cpu", "--no-progress"]) == 2
    assert "'n0209960l' (did you mean n02099601?)" in capsys.readouterr().err


def test_finetune_and_select_with_a_relative_data_path(tmp_path, monkeypatch):
    """Issue 14.1: a relative --data (and one through a symlink) used to end in a ValueError traceback."""
    init = make_init(tmp_path / "init")
    _grey_folder(tmp_path / "store" / "train", ["0", "1"])
    (tmp_path / "link").symlink_to(tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--data", "store/train", "--init", str(init), "--out", "ft", "--batch-size", "4",
                 "--steps", "1", "--device", "cpu", "--no-progress"]) == 0
    assert main(["finetune", "--data", "link/train/", "--init", str(init), "--out", "ft2", "--batch-size", "4",
                 "--steps", "1", "--device", "cpu", "--no-progress"]) == 0
    assert main(["select", "--data", "./store/train", "--ipc", "2", "--out", "sel"]) == 0
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["0", "1", "grid.png", "manifest.json"]


# ----- --epochs or --steps ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["pretrain", "finetune", "run", "bench"])
def test_an_explicit_epochs_wins_over_the_default_steps(command):
    """Every command that trains: --epochs alone leaves --steps unset (the default number of steps no longer
    decides), --steps alone or neither keep the steps."""
    from memdistill.bench.command import config_from_namespace
    from memdistill.cli import build_parser
    from memdistill.finetune import finetune_defaults
    from memdistill.options import config_from_args
    from memdistill.pretrain import pretrain_defaults

    base = pretrain_defaults() if command == "pretrain" else finetune_defaults()

    def parsed(*options):
        args = build_parser().parse_args([command, *options])
        if command == "bench":
            return config_from_namespace(args).finetune
        return config_from_args(TrainConfig, args, base)

    cfg = parsed("--epochs", "0.5")
    assert (cfg.steps, cfg.epochs) == (None, 0.5)
    cfg = parsed("--steps", "7")
    assert (cfg.steps, cfg.epochs) == (7, None)
    cfg = parsed()
    assert cfg.steps == base.steps is not None and cfg.epochs is None


@pytest.mark.parametrize("command", ["pretrain", "finetune", "run", "bench"])
def test_steps_and_epochs_together_are_refused(command, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([command, "--steps", "3", "--epochs", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps" in err[0] and "--epochs" in err[0] and "not both" in err[0], err
    assert not out.exists()


def test_finetune_runs_the_epochs_it_is_given(tiny_model, tmp_path):
    out = tmp_path / "run"
    # digits: 1437 training images, batch 8 -> 179 steps per epoch; 0.02 epochs -> 4 steps (not the default 500)
    assert main(["finetune", "--data", "digits", "--init", str(tiny_model), "--out", str(out), "--epochs", "0.02",
                 "--memory", "none", "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["steps"] == 4
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


def test_codec_auto_takes_the_init_models_own_codec_and_vae(tiny_model):
    """--codec auto (the default): a latent model is tuned on the latents of the VAE its export records (the
    embedded default: mnist5k-latent on mnist5k-vae); a pixel model, or no --init, on pixels; --vae means vae."""
    from memdistill.finetune import finetune_defaults

    latent = finetune_defaults().with_resolved_codec()
    assert (latent.init, latent.codec, latent.vae) == ("mnist5k-latent", "vae", "mnist5k-vae")
    pixel = dataclasses.replace(finetune_defaults(), init=str(tiny_model)).with_resolved_codec()
    assert (pixel.codec, pixel.vae) == ("pixel", None)
    assert dataclasses.replace(finetune_defaults(), init="mnist5k").with_resolved_codec().codec == "pixel"
    assert TrainConfig(init=None).with_resolved_codec().codec == "pixel"
    assert TrainConfig(init=str(tiny_model), vae="my-vae").with_resolved_codec().codec == "vae"
    with pytest.raises(UserError, match="--codec must be one of auto, pixel, vae"):
        TrainConfig(codec="latent").validate()
