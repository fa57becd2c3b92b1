"""How the process uses the CPU: thread count, OpenMP wait policy, the glibc allocator, and numeric precision.

Measured on the 2-core development machine (docs/benchmarks.md, "Using the CPU well"):
- torch's default (one thread per core, OpenMP threads spinning while they wait) is many times slower than one
  thread when another job holds a core; with ``OMP_WAIT_POLICY=passive`` waiting threads sleep instead.
  libgomp reads that variable once, when torch is imported, so ``prepare_environment`` must run before
  ``import torch`` (``cli.main`` calls it first thing).
- glibc hands large activation buffers back to the OS after every step and page-faults them back in on the
  next; raising its mmap and trim thresholds at start-up keeps them (``tune_allocator``).

This module imports torch lazily so that ``prepare_environment`` can run before torch is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys

from .errors import UserError

log = logging.getLogger(__name__)

THREADS_ENV = "MEMDISTILL_THREADS"
MALLOC_ENV = "MEMDISTILL_MALLOC"
MALLOC_MODES = ("tuned", "default")
# auto: tf32 on CUDA, fp32 elsewhere; fast: bf16 on a CPU that computes it natively, else auto (resolve_precision).
PRECISIONS = ("auto", "fast", "fp32", "tf32", "bf16")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# 32 MiB is glibc's largest mmap threshold on 64-bit: blocks below it come from the heap and are reused.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Keep up to 512 MiB of freed memory at the top of the heap instead of returning it after every step.
TRIM_THRESHOLD = 512 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024

# What this process chose; recorded in every manifest (manifest.versions) and results.json.
_state: dict = {"threads": None, "threads_source": None, "wait_policy": None, "wait_policy_effective": None,
                "malloc": None}


# ----- threads and wait policy ------------------------------------------------------------------------------
def parse_threads(value: str | int | None, option: str = "--threads") -> int | None:
    """``auto``/None -> None (choose automatically); a positive integer -> itself; anything else: UserError."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        text = str(value).strip().lower()
        if text in ("auto", ""):
            return None
        try:
            n = int(text)
        except ValueError:
            n = 0
    if n < 1:
        raise UserError(f"{option} must be a positive integer or auto, got {value!r}")
    return n


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which respects taskset and cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads for the automatic default: the cores not busy with other work, at least 1, at most ``cores``.

    ``load`` is the 1-minute load average (os.getloadavg) unless given. Each busy core costs a thread: a
    thread that shares its core with another job makes every parallel region wait for the slowest thread.
    The load is rounded to the nearest whole job so that background noise (load 0.2) leaves a core free.
    """
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    free = cores - math.floor(load + 0.5)
    return max(1, min(cores, free))


def prepare_environment() -> None:
    """Start-up settings that only work before torch is imported: OMP_WAIT_POLICY=passive unless the user set
    it, then the allocator (MEMDISTILL_MALLOC). Safe to call more than once and after torch was imported (the
    wait policy is then recorded as not effective)."""
    if _state["wait_policy"] is None:
        effective = "torch" not in sys.modules
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        _state["wait_policy"] = os.environ["OMP_WAIT_POLICY"]
        _state["wait_policy_effective"] = effective
    if _state["malloc"] is None:
        _state["malloc"] = tune_allocator(os.environ.get(MALLOC_ENV, "tuned"))


def set_threads(requested: str | int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    Precedence: ``requested`` (--threads), then MEMDISTILL_THREADS, then OMP_NUM_THREADS (the user's own
    choice, left as torch read it), else auto_threads(). ``auto`` anywhere means the automatic choice.
    Raises UserError for a value that is neither a positive integer nor auto.
    """
    import torch

    n, source = parse_threads(requested, "--threads"), "--threads"
    if n is None and requested is None and os.environ.get(THREADS_ENV):
        n, source = parse_threads(os.environ[THREADS_ENV], THREADS_ENV), THREADS_ENV
    if n is None and requested is None and not os.environ.get(THREADS_ENV) and os.environ.get("OMP_NUM_THREADS"):
        n, source = torch.get_num_threads(), "OMP_NUM_THREADS"
    if n is None:
        n, source = auto_threads(), "auto"
    torch.set_num_threads(n)
    _state.update(threads=n, threads_source=source)
    log.info("threads: %d (%s), of %d cores; OMP_WAIT_POLICY=%s%s", n, source, available_cores(),
             _state["wait_policy"] or os.environ.get("OMP_WAIT_POLICY", "unset"),
             "" if _state["wait_policy_effective"] is not False else " (set after torch was loaded: not in effect)")
    return n


# ----- allocator --------------------------------------------------------------------------------------------
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator(mode: str = "tuned") -> str:
    """Raise glibc's mmap and trim thresholds so that freed activation buffers are reused, not returned to the
    OS and faulted back in on the next step. Process-wide and irreversible; call once at start-up.

    mode: ``tuned`` (the default) or ``default`` (leave malloc alone). Returns what was done: ``tuned``,
    ``default`` or ``unsupported`` (not glibc). Raises UserError for another mode.
    """
    mode = mode.strip().lower()
    if mode not in MALLOC_MODES:
        raise UserError(f"{MALLOC_ENV} must be one of {', '.join(MALLOC_MODES)}, got {mode!r}")
    if mode == "default":
        return "default"
    libc = _glibc()
    if libc is None:
        return "unsupported"
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return "tuned" if ok else "unsupported"


# ----- progress bars ----------------------------------------------------------------------------------------
_bars: dict = {"on": None}  # None: a bar wherever stderr is a terminal (tqdm's disable=None)


def set_progress(on: bool | None) -> None:
    """--progress / --no-progress for every bar of this process (None: bars where stderr is a terminal)."""
    _bars["on"] = on


def bars_disabled() -> bool | None:
    """tqdm's ``disable`` for a bar of the stages: True after --no-progress, else None (tqdm then shows the bar
    only when its stream is a terminal)."""
    return True if _bars["on"] is False else None


# ----- record -----------------------------------------------------------------------------------------------
def runtime_info() -> dict:
    """What this process runs with: threads (torch's current count), how they were chosen, the OpenMP wait
    policy and whether it was in effect, the allocator mode, the core count. For manifests."""
    threads = _state["threads"]
    if "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    return {"threads": threads, "threads_source": _state["threads_source"],
            "wait_policy": _state["wait_policy"] or os.environ.get("OMP_WAIT_POLICY"),
            "wait_policy_effective": _state["wait_policy_effective"], "malloc": _state["malloc"] or "default",
            "cores": available_cores()}


# ----- precision --------------------------------------------------------------------------------------------
def check_precision(value: str, option: str = "--precision") -> str:
    """auto, fp32, tf32 or bf16; UserError naming ``option`` otherwise."""
    if value not in PRECISIONS:
        raise UserError(f"{option} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def resolve_precision(precision: str, device) -> str:
    """The precision a stage runs at on ``device``: ``auto`` is tf32 on CUDA and fp32 elsewhere; ``fast`` is bf16
    on a CPU that computes bf16 natively (cpu_has_bf16: there bf16 autocast halved the evaluation time) and
    ``auto`` elsewhere (emulated bf16 can be slower than fp32; on CUDA tf32 already serves); tf32 exists on CUDA
    only (TensorFloat-32 matrix products on Ampere and later), so elsewhere it means fp32. Raises UserError for an
    unknown ``precision``."""
    import torch

    check_precision(precision)
    cuda = torch.device(device).type == "cuda"
    if precision == "fast":  # bf16 only where it is native and measured to pay (the CPU's bf16 instructions)
        precision = "auto" if cuda or not cpu_has_bf16() else "bf16"
    if precision == "auto":
        return "tf32" if cuda else "fp32"
    if precision == "tf32" and not cuda:
        return "fp32"
    return precision


def announce_precision(precision: str, device) -> str:
    """``resolve_precision`` plus one log line saying what was chosen (a warning when tf32 was asked for where
    it does not exist). Call once per stage."""
    import torch

    resolved = resolve_precision(precision, device)
    if precision == "tf32" and resolved == "fp32":
        log.warning("--precision tf32 applies to CUDA only; running in fp32 on %s", torch.device(device))
    else:
        log.info("precision: %s%s on %s", resolved, f" ({precision})" if precision in ("auto", "fast") else "",
                 torch.device(device))
    return resolved


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast pays: without
    them oneDNN emulates bf16 and it can be slower than fp32."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def memory_format(device, precision: str):
    """The tensor layout a convolutional classifier should train and test in at ``precision`` on ``device``:
    torch.channels_last for bf16 on a CPU, where oneDNN's bf16 convolutions (AMX/AVX512-BF16 kernels) and the
    pooling run faster in it (ConvNet-3 evaluation end to end 1.24x eager, 1.34x compiled; benchmarks/bench_cpu.py,
    "layout"), else torch.contiguous_format. fp32 keeps NCHW: there channels-last was slower, and fp32 results
    stay those of earlier versions."""
    import torch

    if torch.device(device).type == "cpu" and resolve_precision(precision, device) == "bf16":
        return torch.channels_last
    return torch.contiguous_format


@contextlib.contextmanager
def matmul_precision(device, precision: str):
    """While active on a CUDA ``device``: TF32 matrix products and convolutions for tf32 and bf16 (which leaves
    autocast's fp32 ops on TF32 too), strict fp32 for fp32; the previous settings come back on exit. Nothing on
    other devices (their fp32 is always fp32). Setting the flags costs no device sync."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    fast = resolve_precision(precision, device) in ("tf32", "bf16")
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = fast
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@contextlib.contextmanager
def autocast(device, precision: str):
    """Context for a forward pass at ``precision`` (resolved as by ``resolve_precision``): bf16 autocast on the
    device's type (CPU or CUDA) -- matrix products and convolutions in bfloat16, losses and reductions kept in
    fp32 by autocast's own lists; tf32: TF32 matrix products on CUDA; fp32: strict fp32. On CUDA the TF32
    settings of ``matmul_precision`` hold inside it."""
    import torch

    resolved = resolve_precision(precision, device)
    with matmul_precision(device, resolved):
        if resolved == "bf16":
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                yield
        else:
            yield
