import os

import pytest
import torch

# Tiny models on a shared 2-core machine: two threads mostly wait on each other, and one thread keeps
# CPU results reproducible. Subprocesses (CLI, torchrun) inherit the environment variables.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield
