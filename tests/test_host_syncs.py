"""No per-step device-to-host syncs in the fine-tuning loop beyond the labels and the adaptive Gram rows
(issue 14.10), counted by benchmarks/bench_host_syncs.py on the CPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_host_syncs  # noqa: E402

from memdistill.diffusion import GaussianDiffusion  # noqa: E402

# memory_loss reads the labels; update reads them and, adaptive only, every bank's new Gram rows at once.
ALLOWED = {"adaptive": 3, "fifo": 2, "none": 0}


@pytest.mark.parametrize("memory", ["adaptive", "fifo", "none"])
def test_a_plain_step_makes_a_fixed_few_host_syncs(memory):
    counter = bench_host_syncs.count(memory, steps=8, memory_max_t=None, device="cpu")
    steps = counter.plain_steps()
    assert len(steps) == 7
    for sites, tables in steps[1:]:  # the first step fills the per-device table cache, once
        assert len(sites) <= ALLOWED[memory], sites
        assert tables == 0  # no schedule table copied to the device per call
    # the filter by timestep costs one more (its indices), not one per sample
    counter = bench_host_syncs.count(memory, steps=5, memory_max_t=500, device="cpu")
    extra = 1 if memory != "none" else 0
    assert all(len(sites) <= ALLOWED[memory] + extra for sites, _ in counter.plain_steps()[1:])


def test_schedule_tables_are_cached_per_device_and_dtype():
    d = GaussianDiffusion()
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 5, 999])
    first = d.base.on("alphas_cumprod", x.device, x.dtype)
    assert d.base.on("alphas_cumprod", x.device, x.dtype) is first and first.dtype == torch.float32
    assert d.base.on("alphas_cumprod", x.device, torch.float64) is not first
    # casting the table before indexing gives what indexing before casting gave
    assert torch.equal(first[t], d.base.alphas_cumprod[t].float())
    assert torch.equal(d.q_sample(x + 1, t, x), d.base.alphas_cumprod[t].float().sqrt().view(-1, 1, 1, 1).expand_as(x))
