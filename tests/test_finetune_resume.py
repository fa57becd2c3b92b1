"""A resumed fine-tuning run ends bit-identical to an uninterrupted one: weights, EMA, optimiser,
memories (with their derived Gram state) and the metrics log, after a clean stop and after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memdistill.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def finetune_args(init, out, steps, *extra):
    return ["finetune", "--data", "digits", "--init", str(init), "--out", str(out), "--batch-size", "8",
            "--steps", str(steps), "--mem-real", "4", "--mem-gen", "3", "--log-every", "1", "--device", "cpu",
            "--no-progress", *map(str, extra)]


def state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(ref: Path, other: Path, steps: int) -> None:
    a, b = state(ref), state(other)
    assert a["step"] == b["step"] == steps
    # ("rng", the global generator's state, is left out: every random draw of a step comes from its
    # own (seed, step) generator, and what the global one holds depends on the process's history.)
    for key in ("model", "ema", "opt", "memories", "config"):
        assert_same_tensors(a[key], b[key], key)
    assert a["memories"] is not None and a["memories"]["real"]  # memories were there to compare
    wa, wb = load_file(ref / "export" / "model.safetensors"), load_file(other / "export" / "model.safetensors")
    assert_same_tensors(wa, wb, "export")
    # The log: each step once, the same values (step_time aside).
    ra, rb = ([{k: v for k, v in json.loads(line).items() if k != "step_time"}
               for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (ref, other))
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    assert ra == rb


@pytest.mark.parametrize("memory", ["adaptive", "fifo"])
def test_resume_from_a_clean_stop_equals_a_straight_run(tiny_model, tmp_path, memory):
    ref, split = tmp_path / "straight", tmp_path / "split"
    assert main(finetune_args(tiny_model, ref, 20, "--memory", memory, "--checkpoint-every", 7)) == 0
    assert main(finetune_args(tiny_model, split, 10, "--memory", memory, "--checkpoint-every", 7)) == 0
    assert state(split)["step"] == 10
    assert main(finetune_args(tiny_model, split, 20, "--memory", memory, "--checkpoint-every", 7, "--resume")) == 0
    assert_same_run(ref, split, 20)


def test_resume_on_the_latent_path_equals_a_straight_run(latent_pair, tmp_path):
    """With a VAE, flipping and a latent cache: each step draws its flips and posterior samples anew, and a resumed
    run draws the same ones (the resume reads the cache the first half wrote)."""
    vae, init = latent_pair
    ref, split, cache = tmp_path / "straight", tmp_path / "split", tmp_path / "cache"
    latent = ["--codec", "vae", "--vae", vae, "--flip", "on", "--latent-cache", cache, "--memory", "adaptive",
              "--checkpoint-every", 5]
    assert main(finetune_args(init, ref, 12, *latent)) == 0
    assert main(finetune_args(init, split, 6, *latent)) == 0
    assert main(finetune_args(init, split, 12, *latent, "--resume")) == 0
    assert_same_run(ref, split, 12)
    assert state(ref)["config"]["flip"] == "on"


@pytest.mark.slow
def test_resume_after_kill_9_equals_an_uninterrupted_run(tiny_model, tmp_path):
    steps, args = 150, ["--memory", "adaptive", "--checkpoint-every", "4"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main(finetune_args(tiny_model, ref, steps, *args)) == 0

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "memdistill", *finetune_args(tiny_model, killed, steps, *args)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped = state(killed)["step"]
    assert 4 <= stopped < steps and stopped % 4 == 0  # killed mid-way, at one of its checkpoints
    assert not (killed / "export").exists()

    assert main(finetune_args(tiny_model, killed, steps, *args, "--resume")) == 0
    assert_same_run(ref, killed, steps)


# ----- what a resume state may hold, and where it goes ------------------------------------------------------
class RunsCode:
    """Unpickling this creates ``marker``: what a hostile last.pt could do with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_state_that_would_run_code(tiny_model, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert main(finetune_args(tiny_model, out, 2, "--memory", "fifo", "--checkpoint-every", 2)) == 0
    saved = state(out)
    torch.save({**saved, "extra": RunsCode(marker)}, out / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert main(finetune_args(tiny_model, out, 4, "--memory", "fifo", "--checkpoint-every", 2, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert len(err.splitlines()) == 1 and "last.pt" in err and "Python object" in err, err
    assert "weights_only=False" not in err and "weights_only" not in err


def test_the_resume_state_holds_only_tensors_and_plain_values(tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(finetune_args(tiny_model, out, 2, "--memory", "adaptive", "--checkpoint-every", 2)) == 0
    s = torch.load(out / "checkpoints" / "last.pt", weights_only=True)  # refuses anything else
    rng = s["rng"]["torch"]
    assert rng.dtype == torch.uint8 and rng.device.type == "cpu"
    assert isinstance(s["config"], dict) and s["config"]["memory"] == "adaptive"


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_resume_loads_on_the_cpu_and_restores_rng_there_whatever_the_device(tiny_model, tmp_path, monkeypatch):
    """A GPU run's resume state: loading it onto the training device would put the CPU generator's state
    there, which torch.set_rng_state refuses. The meta device stands in for a GPU."""
    import memdistill.train as train

    out = tmp_path / "run"
    assert main(finetune_args(tiny_model, out, 2, "--memory", "adaptive", "--checkpoint-every", 2)) == 0
    seen = {}

    class Restored(Exception):
        pass

    def set_rng_state(new_state):
        seen["rng"] = new_state
        torch.random.set_rng_state(new_state)

    def stop(*_):
        seen["model"] = next(iter(seen_model.parameters())).device
        raise Restored

    seen_model = None
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):  # remember the model moved to the stand-in device
        nonlocal seen_model
        moved = real_to(self, *args, **kwargs)
        if seen_model is None and hasattr(moved, "blocks"):
            seen_model = moved
        return moved

    monkeypatch.setattr(train, "dist_setup", lambda name: (0, 1, torch.device("meta")))
    monkeypatch.setattr(train.torch, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(train, "_trim_metrics", stop)  # everything is restored by then
    with pytest.raises(Restored):
        main(finetune_args(tiny_model, out, 4, "--memory", "adaptive", "--checkpoint-every", 2, "--resume"))
    assert seen["rng"].device.type == "cpu" and seen["rng"].dtype == torch.uint8
    assert seen["model"].type == "meta"


def test_cuda_generators_are_restored_as_host_states(monkeypatch):
    """CUDA generator states are saved as CPU uint8 tensors and restored with set_rng_state_all, for the
    devices present (mocked: this machine may have no GPU)."""
    import memdistill.train as train

    got = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: got.setdefault("cuda", states))
    cpu = torch.get_rng_state()
    two_gpus = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    train.restore_rng({"torch": cpu, "cuda": two_gpus})
    assert len(got["cuda"]) == 1 and torch.equal(got["cuda"][0], two_gpus[0])
    assert torch.equal(torch.get_rng_state(), cpu)


# ----- Ctrl-C ----------------------------------------------------------------------------------------------
def interrupt_at(monkeypatch, at_step: int, how):
    """Patch the loop's first call of a step so that, at step index ``at_step``, ``how()`` runs."""
    import memdistill.train as train

    real = train.step_draws

    def step_draws(cfg, step, *args):
        if step == at_step and not getattr(step_draws, "fired", False):
            step_draws.fired = True
            how()
        return real(cfg, step, *args)

    monkeypatch.setattr(train, "step_draws", step_draws)


def raise_interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("how, saved_at", [
    (raise_interrupt, 8),  # between steps: the 8 completed steps are saved
    (lambda: os.kill(os.getpid(), signal.SIGINT), 9),  # Ctrl-C: step 9 completes first, then is saved
])
def test_ctrl_c_saves_the_last_completed_step_and_resume_continues(tiny_model, tmp_path, monkeypatch, how, saved_at):
    args = ["--memory", "adaptive", "--checkpoint-every", 5]
    ref, cut = tmp_path / "straight", tmp_path / "interrupted"
    assert main(finetune_args(tiny_model, ref, 12, *args)) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 8, how)
        assert main(finetune_args(tiny_model, cut, 12, *args)) == 130
    assert state(cut)["step"] == saved_at  # not the checkpoint of step 5
    assert not (cut / "export").exists()
    assert main(finetune_args(tiny_model, cut, 12, *args, "--resume")) == 0
    assert_same_run(ref, cut, 12)


# ----- lean resume states under DiffFit ---------------------------------------------------------------------
def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def _tuned_names(init) -> tuple[set[str], int, int]:
    """The parameters --train difffit tunes, and the entries and bytes of the whole model's state dict."""
    from memdistill.models.dit import set_trainable
    from memdistill.models.io import load_dit

    model = load_dit(init)
    set_trainable(model, "difffit")
    sd = model.state_dict()
    return {n for n, p in model.named_parameters() if p.requires_grad}, len(sd), _tensor_bytes(sd)


def test_a_difffit_resume_state_holds_only_the_tuned_parameters(tiny_model, tmp_path):
    lean, full = tmp_path / "difffit", tmp_path / "all"
    assert main(finetune_args(tiny_model, lean, 2, "--memory", "adaptive", "--checkpoint-every", 2)) == 0
    assert main(finetune_args(tiny_model, full, 2, "--memory", "adaptive", "--checkpoint-every", 2,
                              "--train", "all")) == 0
    tuned, entries, model_bytes = _tuned_names(tiny_model)
    s = state(lean)
    assert set(s["model"]) == set(s["ema"]) == tuned  # no frozen weight, in the model or its EMA
    assert s["frozen"]["init"] == str(tiny_model) and len(s["frozen"]["sha256"]) == 64
    assert s["frozen"]["keys"] == entries - len(tuned)
    moments = [[v[k] for k in ("exp_avg", "exp_avg_sq")] for v in s["opt"]["state"].values()]
    tuned_bytes = _tensor_bytes(s["model"])
    assert _tensor_bytes(s["ema"]) == tuned_bytes and _tensor_bytes(moments) == 2 * tuned_bytes
    weights = _tensor_bytes([s["model"], s["ema"], s["opt"]])
    # the frozen weights, twice (model and EMA), are what a full state would add
    size = (lean / "checkpoints" / "last.pt").stat().st_size
    assert size < weights + _tensor_bytes(s["memories"]) + 64 * 1024
    assert size + 2 * (model_bytes - tuned_bytes) > 2 * size
    assert state(full)["frozen"] is None and set(state(full)["model"]) == set(state(full)["ema"])


def test_train_all_saves_everything_and_resumes_bit_identically(tiny_model, tmp_path):
    args = ["--memory", "fifo", "--checkpoint-every", 3, "--train", "all"]
    ref, split = tmp_path / "straight", tmp_path / "split"
    assert main(finetune_args(tiny_model, ref, 6, *args)) == 0
    assert main(finetune_args(tiny_model, split, 3, *args)) == 0
    assert state(split)["frozen"] is None
    saved = state(split)["model"]
    assert set(saved) == set(state(split)["ema"]) and len(saved) > len(_tuned_names(tiny_model)[0])
    assert main(finetune_args(tiny_model, split, 6, *args, "--resume")) == 0
    assert_same_run(ref, split, 6)


def _copy_init(tiny_model, folder: Path) -> Path:
    import shutil

    shutil.copytree(tiny_model, folder)
    return folder


def test_resume_refuses_a_changed_init_checkpoint(tiny_model, tmp_path, capsys):
    from safetensors.torch import save_file

    init, out = _copy_init(tiny_model, tmp_path / "init"), tmp_path / "run"
    args = ["--memory", "fifo", "--checkpoint-every", 2]
    assert main(finetune_args(init, out, 2, *args)) == 0
    tuned = _tuned_names(init)[0]
    weights = load_file(init / "model.safetensors")
    frozen = next(k for k in sorted(weights) if k not in tuned and k.endswith("weight"))
    save_file({**weights, frozen: weights[frozen] + 1e-3}, init / "model.safetensors")  # same path, other content
    capsys.readouterr()
    assert main(finetune_args(init, out, 4, *args, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init" in err[0] and "differ" in err[0] and "--overwrite" in err[0], err
    assert state(out)["step"] == 2  # nothing was overwritten
    # the original content back: the run continues
    save_file(weights, init / "model.safetensors")
    assert main(finetune_args(init, out, 4, *args, "--resume")) == 0


def test_a_full_state_of_an_older_version_still_resumes_under_difffit(tiny_model, tmp_path):
    """States saved before the lean format hold every weight: they load whole, and the run goes on identically."""
    args = ["--memory", "adaptive", "--checkpoint-every", 3]
    ref, old = tmp_path / "straight", tmp_path / "old"
    assert main(finetune_args(tiny_model, ref, 6, *args)) == 0
    assert main(finetune_args(tiny_model, old, 3, *args)) == 0
    from memdistill.models.dit import set_trainable
    from memdistill.models.io import load_dit

    s = state(old)
    model = load_dit(tiny_model)
    set_trainable(model, "difffit")
    full = {**model.state_dict(), **s["model"]}
    full_ema = {**model.state_dict(), **s["ema"]}
    del s["frozen"]
    torch.save({**s, "model": full, "ema": full_ema}, old / "checkpoints" / "last.pt")
    assert main(finetune_args(tiny_model, old, 6, *args, "--resume")) == 0
    assert_same_run(ref, old, 6)


# ----- a resume continues the same run: same data, same folders, not shorter ----------------------------------
def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0], err
    return err[0]


def image_tree(root: Path, per_class: int = 6) -> Path:
    """Two classes of 8x8 grey PNGs (a class-per-folder tree)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (8, 8), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / c / f"{i}.png")
    return root


def pretrain_args(data, out, steps, *extra):
    return ["pretrain", "--codec", "pixel", "--data", str(data), "--model", "DiT-Micro/2", "--out", str(out), "--batch-size", "4",
            "--steps", str(steps), "--checkpoint-every", "1", "--device", "cpu", "--no-progress", *map(str, extra)]


def test_resume_refuses_other_data_and_accepts_the_same_folder_however_typed(tmp_path, monkeypatch, capsys):
    from PIL import Image

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    image_tree(work / "imgs")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert main(pretrain_args("imgs", "run", 2)) == 0
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["data"] == str((work / "imgs").resolve())  # stored as the folder used, not as typed
    # the same folder typed otherwise, and from another working directory: the run goes on
    assert main(pretrain_args("./imgs", "run", 3, "--resume")) == 0
    monkeypatch.chdir(elsewhere)
    assert main(pretrain_args(work / "imgs", work / "run", 4, "--resume")) == 0
    assert state(work / "run")["step"] == 4
    # one more image: other data, refused with one line before anything changes
    Image.new("L", (8, 8)).save(work / "imgs" / "a" / "new.png")
    capsys.readouterr()
    assert main(pretrain_args(work / "imgs", work / "run", 6, "--resume")) == 2
    err = one_error(capsys)
    assert "data differ" in err and "--data" in err and "--overwrite" in err, err
    assert state(work / "run")["step"] == 4
    # another folder of the same name relative to another working directory is not the run's folder
    image_tree(elsewhere / "imgs")
    assert main(pretrain_args("imgs", work / "run", 6, "--resume")) == 2
    assert "--resume with changed settings (data:" in one_error(capsys)


def test_resume_with_init_typed_relative_or_absolute(tiny_model, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "init")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(finetune_args("init", out, 2, "--memory", "fifo", "--checkpoint-every", 1)) == 0
    assert json.loads((out / "config.json").read_text())["init"] == str((tmp_path / "init").resolve())
    monkeypatch.chdir(tmp_path / "sub")
    assert main(finetune_args("../init", out, 3, "--memory", "fifo", "--checkpoint-every", 1, "--resume")) == 0
    assert main(finetune_args(tmp_path / "init", out, 4, "--memory", "fifo", "--checkpoint-every", 1,
                              "--resume")) == 0
    assert state(out)["step"] == 4


def test_resume_refuses_fewer_steps_than_reached(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(finetune_args(tiny_model, out, 3, "--memory", "fifo", "--checkpoint-every", 1)) == 0
    capsys.readouterr()
    assert main(finetune_args(tiny_model, out, 1, "--memory", "fifo", "--checkpoint-every", 1, "--resume")) == 2
    err = one_error(capsys)
    assert "--steps 1" in err and "step 3" in err, err
    assert json.loads((out / "manifest.json").read_text())["steps"] == 3 and state(out)["step"] == 3
    # the same number of steps is a finished run resumed: nothing to do, the same length recorded
    assert main(finetune_args(tiny_model, out, 3, "--memory", "fifo", "--checkpoint-every", 1, "--resume")) == 0


DAMAGED_CONFIGS = {"truncated": '{"data": "digits", "lr"', "not an object": '["a"]', "deleted": None}


@pytest.mark.parametrize("damage", DAMAGED_CONFIGS)
def test_resume_with_a_damaged_config_uses_the_settings_in_the_resume_state(tiny_model, tmp_path, capsys, damage):
    args = ["--memory", "fifo", "--checkpoint-every", 2]
    ref, out = tmp_path / "straight", tmp_path / "run"
    assert main(finetune_args(tiny_model, ref, 4, *args)) == 0
    assert main(finetune_args(tiny_model, out, 2, *args)) == 0
    config = out / "config.json"
    if DAMAGED_CONFIGS[damage] is None:
        config.unlink()
    else:
        config.write_text(DAMAGED_CONFIGS[damage])
    capsys.readouterr()
    # other settings are still refused, now by the copy in the resume state
    assert main(finetune_args(tiny_model, out, 4, *args, "--lr", "0.002", "--resume")) == 2
    assert "changed settings (lr: 0.001 -> 0.002)" in one_error(capsys)
    assert main(finetune_args(tiny_model, out, 4, *args, "--resume")) == 0
    assert json.loads(config.read_text())["memory"] == "fifo"  # written again
    assert_same_run(ref, out, 4)


def test_resume_skips_metrics_lines_that_are_not_rows(tiny_model, tmp_path):
    args = ["--memory", "fifo", "--checkpoint-every", 2]
    ref, out = tmp_path / "straight", tmp_path / "run"
    assert main(finetune_args(tiny_model, ref, 4, *args)) == 0
    assert main(finetune_args(tiny_model, out, 2, *args)) == 0
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{}\n["a"]\n{"step": "x"}\n7\n{"step": null}\n')
    assert main(finetune_args(tiny_model, out, 4, *args, "--resume")) == 0
    assert_same_run(ref, out, 4)


# ----- SIGTERM, and what sampling says about an unfinished run -----------------------------------------------
def test_sigterm_saves_the_completed_step_and_exits_143(tiny_model, tmp_path, monkeypatch):
    args = ["--memory", "adaptive", "--checkpoint-every", 5]
    ref, cut = tmp_path / "straight", tmp_path / "terminated"
    assert main(finetune_args(tiny_model, ref, 12, *args)) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 8, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert main(finetune_args(tiny_model, cut, 12, *args)) == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the loop's handler is gone again
    assert state(cut)["step"] == 9  # step 9 completes, then is saved
    assert not (cut / "export").exists()
    assert main(finetune_args(tiny_model, cut, 12, *args, "--resume")) == 0
    assert_same_run(ref, cut, 12)


def sample_error(capsys, model, tmp_path) -> str:
    capsys.readouterr()
    assert main(["sample", "--model", str(model), "--ipc", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "set")]) == 2
    return one_error(capsys)


def test_sample_of_a_run_stopped_before_its_first_checkpoint(tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 0, raise_interrupt)  # before the first step completes: nothing to save
        assert main(finetune_args(tiny_model, out, 12, "--checkpoint-every", 5)) == 130
    assert (out / "config.json").is_file() and not (out / "checkpoints" / "last.pt").exists()
    err = sample_error(capsys, out, tmp_path)
    assert "unfinished finetune run" in err and "--overwrite" in err and "not a memdistill export" not in err, err


def test_sample_of_a_diverged_run_without_checkpoint(tiny_model, tmp_path, monkeypatch, capsys):
    import memdistill.train as train

    real = train.GaussianDiffusion.training_losses

    def nan_loss(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(train.GaussianDiffusion, "training_losses", nan_loss)
        assert main(finetune_args(tiny_model, out, 4, "--checkpoint-every", 2)) == 2
    err = sample_error(capsys, out, tmp_path)
    assert "unfinished finetune run" in err and "not a memdistill export" not in err, err


def test_sample_of_a_resume_state_names_what_to_pass(tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 3, raise_interrupt)
        assert main(finetune_args(tiny_model, out, 12, "--checkpoint-every", 5)) == 130
    err = sample_error(capsys, out / "checkpoints" / "last.pt", tmp_path)
    assert "resume state" in err and "not a model" in err and f"--resume --out {out}" in err, err
    assert main(finetune_args(tiny_model, out, 4, "--checkpoint-every", 5, "--resume")) == 0
    err = sample_error(capsys, out / "checkpoints" / "last.pt", tmp_path)
    assert "resume state" in err and f"pass the run folder {out}" in err, err
    # finetune --init reads models the same way
    assert main(finetune_args(out / "checkpoints" / "last.pt", tmp_path / "run2", 2)) == 2
    assert "resume state" in one_error(capsys)
