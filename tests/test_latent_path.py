"""The latent (VAE) path of fine-tuning: the device is set before data are loaded, the VAE loads only where
latents are encoded (rank 0 under torchrun, never on a latent-cache hit), and two gloo processes equal one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memdistill.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
VAE_LOADED = "loaded the AutoencoderKL"


def finetune_args(vae, init, out, *extra):
    return ["-v", "finetune", "--data", "digits", "--codec", "vae", "--vae", str(vae), "--init", str(init),
            "--out", str(out), "--batch-size", "8", "--steps", "3", "--memory", "adaptive", "--device", "cpu",
            "--no-progress", *extra]


def test_finetune_sets_the_device_before_loading_data(monkeypatch, tmp_path):
    import memdistill.finetune as finetune_module

    calls = []
    device = torch.device("cpu")
    monkeypatch.setattr(finetune_module, "dist_setup", lambda name: calls.append("device") or (0, 1, device))

    def load(cfg, dev=None, rank=0, world=1):
        calls.append(("data", dev, rank, world))
        raise KeyboardInterrupt  # stop here: only the order matters

    monkeypatch.setattr(finetune_module, "load_train_data", load)
    with pytest.raises(KeyboardInterrupt):
        finetune_module.finetune(finetune_module.finetune_defaults(), tmp_path / "out")
    assert calls == ["device", ("data", device, 0, 1)]


def test_latent_cache_hit_does_not_load_the_vae(latent_pair, tmp_path, caplog):
    vae, init = latent_pair
    cache = tmp_path / "cache"
    caplog.set_level("INFO")
    assert main(finetune_args(vae, init, tmp_path / "a", "--latent-cache", str(cache))) == 0
    assert sum(VAE_LOADED in r.getMessage() for r in caplog.records) == 1
    assert list(cache.glob("posterior-*.safetensors"))
    caplog.clear()
    assert main(finetune_args(vae, init, tmp_path / "b", "--latent-cache", str(cache))) == 0
    assert not any(VAE_LOADED in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_two_gloo_processes_encode_once_and_match_one_process(latent_pair, tmp_path):
    from safetensors.torch import load_file

    vae, init = latent_pair
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    runs = {}
    for out, launcher in ((one, []), (two, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        proc = subprocess.run([sys.executable, *launcher, "-m", "memdistill", *finetune_args(vae, init, out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[out] = proc.stderr
    # The VAE was loaded by one process only: rank 0 encoded, rank 1 received the latents.
    assert runs[two].count(VAE_LOADED) == 1, runs[two][-3000:]
    wa, wb = (load_file(out / "export" / "model.safetensors") for out in (one, two))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-5), name


def _png_tree(root, per_class=4):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    return root


def test_cache_hit_on_folder_data_decodes_no_image(latent_pair, tmp_path, monkeypatch, capsys):
    import memdistill.data as data

    vae, init = latent_pair
    tree = _png_tree(tmp_path / "tree")
    args = ["finetune", "--data", str(tree), "--codec", "vae", "--vae", str(vae), "--init", str(init),
            "--batch-size", "8", "--steps", "2", "--device", "cpu", "--no-progress", "--latent-cache",
            str(tmp_path / "cache")]
    decoded = []
    real_check = data._check_image
    monkeypatch.setattr(data, "_check_image", lambda p: decoded.append(p) or real_check(p))
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(decoded) == 40  # the miss decodes (checks) every image once before encoding
    decoded.clear()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert decoded == []  # the hit reads headers only
    # A damaged image under a cache miss is still one clear line.
    (tree / "3" / "0.png").write_bytes(b"not a png")
    assert main([*args, "--out", str(tmp_path / "c")]) == 2
    assert "unreadable image" in capsys.readouterr().err
