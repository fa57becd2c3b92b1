import os

import pytest
import torch

# Tiny models on a shared 2-core machine: two threads mostly wait on each other, and one thread keeps
# CPU results reproducible. Subprocesses (CLI, torchrun) inherit the environment variables.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _references_cache(tmp_path_factory):
    """Reference accuracies (memdistill.references) are cached in a folder of the test session, never in the
    user's ~/.cache; subprocesses inherit it."""
    os.environ["MEMDISTILL_CACHE"] = str(tmp_path_factory.mktemp("memdistill-cache"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="session")
def _judge_cache(tmp_path_factory):
    """Judges trained by tests go to a temporary cache, never the user's ~/.cache/memdistill."""
    saved = os.environ.get("MEMDISTILL_CACHE")
    os.environ["MEMDISTILL_CACHE"] = str(tmp_path_factory.mktemp("memdistill-cache"))
    yield
    if saved is None:
        os.environ.pop("MEMDISTILL_CACHE", None)
    else:
        os.environ["MEMDISTILL_CACHE"] = saved


DIGITS = [str(i) for i in range(10)]


def digits_folder(root, count=None, classes=None, per_class=None):
    """``root`` as a class-per-folder tree of 8 px grey PNGs of the embedded digits' training images: the first
    ``count`` of them, or the first ``per_class`` of each of ``classes``. Returns ``root``."""
    from PIL import Image

    from memdistill.data import load_tensors, open_dataset

    x, y = load_tensors(open_dataset("digits", "train"))
    if classes is None:
        picks = range(count)
    else:
        picks = [i for c in classes for i in (y == c).nonzero().flatten()[:per_class].tolist()]
    for i in picks:
        folder = root / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((x[i, 0] + 1) * 127.5).round().byte().numpy(), "L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 'pretrained' micro DiT for the 8x8 digits (random weights: the pipeline, not quality, is tested)."""
    from memdistill.models.dit import build_dit
    from memdistill.models.io import save_export

    torch.manual_seed(0)
    model = build_dit("DiT-Micro/2", input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape) * 0.05)
    folder = tmp_path_factory.mktemp("model") / "export"
    save_export(folder, model, {"class_names": DIGITS, "cond_labels": list(range(10)), "codec": {"name": "pixel"},
                                "image_shape": [1, 8, 8], "latent_shape": [1, 8, 8], "stage": "pretrain"})
    return folder


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """A random real selection of the digits, 2 images per class, written by the select command."""
    from memdistill.cli import main

    out = tmp_path_factory.mktemp("set") / "sel"
    assert main(["select", "--data", "digits", "--ipc", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def latent_pair(tmp_path_factory):
    """A tiny 1-channel VAE (8x8 digits -> 4x4x4 latents) and a matching micro DiT export (random weights)."""
    from diffusers import AutoencoderKL

    from memdistill.models.dit import build_dit
    from memdistill.models.io import save_export

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8, scaling_factor=0.5)
    vae.save_pretrained(root / "vae")
    model = build_dit("DiT-Micro/2", input_size=4, in_channels=4, num_classes=10)
    save_export(root / "dit", model, {"class_names": [str(i) for i in range(10)], "cond_labels": list(range(10)),
                                      "codec": {"name": "vae", "path": str(root / "vae")}, "image_shape": [1, 8, 8],
                                      "latent_shape": [4, 4, 4], "stage": "pretrain"})
    return root / "vae", root / "dit"
