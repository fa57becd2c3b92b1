"""Device names: what every command accepts for --device, with a clear error for the rest."""

import pytest
import torch

from memdistill.devices import dist_setup, resolve_device
from memdistill.errors import UserError


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "mps", ""])
def test_unknown_names(name):
    with pytest.raises(UserError, match="unknown device"):
        resolve_device(name)


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == torch.device("cpu")


def test_dist_setup_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_setup("cpu") == (0, 1, torch.device("cpu"))
