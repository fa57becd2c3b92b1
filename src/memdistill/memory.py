"""Per-class memories of latents and their eviction strategies (METHOD.md section 4).

"adaptive" (the paper): append, then while over capacity evict the entry whose summed cosine
similarity to the whole memory (diagonal included) is largest, i.e. the most redundant one.
"fifo" (Minimax): evict the oldest entries.

The adaptive bank keeps the unit-normalised entries, their Gram (cosine) matrix and its row
sums between updates, so an update costs O(n (K + n) d) for the new Gram rows plus O(K) per
eviction, instead of O(K^2 d) per eviction for the recompute-from-scratch rule
(`naive_adaptive_keep`, kept as the reference for tests and benchmarks).

An update runs every training step for every class in the batch, on small tensors, so copies of
whole memories and per-operation overhead dominate. Hence the adaptive bank's slot storage (see
MemoryBank), the K x K bookkeeping and the eviction loop in NumPy (the same float64 operations, so
the same numbers as in torch), and `ClassMemories.update` splitting and normalising the batch once
for all classes. tests/test_memory.py checks the result against the naive rule.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import torch

from memdistill.errors import UserError

STRATEGIES = ("adaptive", "fifo")
COS_EPS = 1e-8
# Incremental row sums differ from freshly summed ones by rounding (~K * 1e-16); scores within
# this tolerance of the maximum count as tied so "first index on ties" does not hinge on rounding.
TIE_TOL = 1e-9


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown memory strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    return strategy


def check_capacity(capacity: int, name: str = "capacity") -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise UserError(f"memory {name} must be an integer >= 1, got {capacity!r}")
    return capacity


def _normalised(x: torch.Tensor, dtype: torch.dtype, device: torch.device, eps: float) -> torch.Tensor:
    """Rows of x (N, ...) flattened, in ``dtype`` on ``device``, divided by max(norm, eps) -> (N, d).

    Each row's result depends on that row alone, so a batch can be normalised once and split.
    """
    flat = x.detach().reshape(x.shape[0], -1).to(dtype=dtype, device=device)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Flatten to rows and normalise in float64; zero rows stay zero (norm clamped at eps)."""
    return _normalised(x, torch.float64, x.device, COS_EPS)  # (N, d)


def _first_argmax(scores: torch.Tensor) -> int:
    """Index of the maximum, the first one among (near-)ties."""
    top = scores.max()
    return int(torch.nonzero(scores >= top - TIE_TOL)[0, 0])


def naive_adaptive_keep(entries: torch.Tensor, capacity: int) -> torch.Tensor:
    """Reference rule: recompute all similarities after every eviction. Returns kept indices, in order."""
    unit = _unit_rows(entries)  # (K, d)
    keep = torch.arange(entries.shape[0], device=entries.device)
    while keep.numel() > capacity:
        u = unit.index_select(0, keep)
        k = _first_argmax((u @ u.T).sum(dim=1))
        keep = torch.cat([keep[:k], keep[k + 1:]])
    return keep


def _square_take(m: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """m[idx][:, idx] as a new array (two takes: several times faster than np.ix_ indexing)."""
    return m.take(idx, axis=0).take(idx, axis=1)


class NonFiniteEntry(ValueError):
    """A latent inserted into an adaptive memory is not finite: the eviction cannot rank NaN cosines."""


class MemoryBank:
    """One class's memory: up to `capacity` latents of one shape, oldest first.

    Entries are detached copies with the dtype/device of the first batch added (later batches
    are converted to it). `tensor()` returns a tensor that later updates never modify in place.

    Storage. "fifo" keeps one tensor, oldest first. "adaptive" keeps its entries in a buffer of
    slots: a batch is written into free slots and survivors of an eviction stay where they are, so
    an update copies O(n d) instead of the whole memory twice (append, then keep). The live
    entries fill slots [0, K); `_age` lists them oldest first. The float64 unit rows share the
    slots, and so do the rows cached by `unit_rows` (kept current by normalising only new rows);
    the K x K Gram matrix and the row sums are NumPy arrays in slot order (CPU), so the eviction
    loop's many tiny steps cost little and need no device round trip.
    """

    def __init__(self, capacity: int, strategy: str):
        self.capacity = check_capacity(capacity)
        self.strategy = check_strategy(strategy)
        self._entries: torch.Tensor | None = None  # fifo: (K, *entry_shape); adaptive: slots (R, *entry_shape)
        self._entry_shape: tuple[int, ...] | None = None
        # adaptive only, float64
        self._unit: torch.Tensor | None = None  # (R, d) normalised entries, same slots, entries' device
        self._gram: np.ndarray | None = None  # (K, K) cosines between live slots
        self._rowsum: np.ndarray | None = None  # (K,) s_k = sum_j cos(m_k, m_j) per live slot
        self._age: np.ndarray | None = None  # (K,) live slots, oldest first
        # Entries as normalised rows in the losses' dtype, keyed by (dtype, device, eps): the losses
        # read every memory every step. fifo: (K, d), rebuilt after a change; adaptive: (R, d) slots.
        self._rows_cache: dict[tuple, torch.Tensor] = {}
        self._pending: tuple[int, int] | None = None  # (K, n) between `_add_adaptive` and `_finish`

    def __len__(self) -> int:
        if self._age is not None:
            return len(self._age)
        return 0 if self._entries is None else self._entries.shape[0]

    @property
    def entry_shape(self) -> tuple[int, ...] | None:
        return self._entry_shape

    def tensor(self) -> torch.Tensor:
        """Current entries (K, *entry_shape), oldest first."""
        if self._age is not None:
            return self._entries.index_select(0, torch.from_numpy(self._age).to(self._entries.device))
        if self._entries is not None:
            return self._entries
        if self._entry_shape is not None:
            return torch.empty((0, *self._entry_shape))
        return torch.empty((0,))

    def unit_rows(self, dtype: torch.dtype, device: torch.device | str, eps: float = COS_EPS) -> torch.Tensor:
        """The entries flattened and normalised in ``dtype`` (K, d): x / max(|x|, eps), as
        `losses.cosine_matrix` computes it, in storage order (oldest first only for "fifo"): for
        order-free reductions such as min and max. Valid until the memory next changes (an adaptive
        bank then updates it in place); do not modify it."""
        key = (dtype, torch.device(device), eps)
        k = len(self)
        rows = self._rows_cache.get(key)
        if rows is None:
            if k == 0:
                d = 0 if self._entry_shape is None else math.prod(self._entry_shape)
                return torch.empty((0, d), dtype=dtype, device=device)
            fresh = _normalised(self._entries[:k], dtype, device, eps)  # (K, d)
            if self.strategy == "fifo":
                rows = fresh
            else:  # sized like the slot buffer, so that updates can write new rows in place
                rows = fresh.new_empty((self._entries.shape[0], fresh.shape[1]))
                rows[:k] = fresh
            self._rows_cache[key] = rows
        return rows[:k]

    def add(self, latents: torch.Tensor) -> None:
        """Append a batch (N, *entry_shape), then evict down to capacity."""
        self._add(latents)

    def _add(self, latents: torch.Tensor, unit: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        """`add`, optionally with ``_unit_rows(latents)`` and the rows ``unit_rows`` would give them
        in their own dtype/device with COS_EPS already computed (for a whole batch at once)."""
        pending = self._begin(latents, unit, rows)
        if pending is not None:
            self._finish(pending.cpu())

    def _begin(self, latents: torch.Tensor, unit: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The device part of `_add`. An adaptive bank returns the new rows of its Gram matrix (n, K+n), still
        on the device, and must get them back on the CPU through `_finish` before anything else touches it
        (so that `ClassMemories.update` reads every bank's rows in one transfer); otherwise None (done)."""
        if latents.dim() < 1:
            raise ValueError("MemoryBank.add expects a batch (N, ...), got a scalar")
        shape = tuple(latents.shape[1:])
        if self._entry_shape is None:
            self._entry_shape = shape
        elif shape != self._entry_shape:
            raise ValueError(f"memory entries have shape {self._entry_shape}, got a batch of {shape}")
        if latents.shape[0] == 0:
            return None
        new = latents.detach()
        if self._entries is None:
            new = new.clone()
        else:
            converted = new.to(dtype=self._entries.dtype, device=self._entries.device)
            if converted is not new:
                new, unit, rows = converted, None, None  # normalise what is stored, not the caller's dtype
        if self.strategy == "fifo":
            self._rows_cache = {}
            self._add_fifo(new)
            return None
        return self._add_adaptive(new, _unit_rows(new) if unit is None else unit, rows)

    def _add_fifo(self, new: torch.Tensor) -> None:
        merged = new if self._entries is None else torch.cat([self._entries, new])
        self._entries = merged[-self.capacity:] if merged.shape[0] > self.capacity else merged

    def _reserve(self, rows: int, like: torch.Tensor, like_unit: torch.Tensor) -> None:
        """Grow the slot buffers to hold at least ``rows`` entries (live ones kept in place)."""
        have = 0 if self._entries is None else self._entries.shape[0]
        if have >= rows:
            return
        size = max(rows, self.capacity + like.shape[0])
        k = len(self)
        buf = like.new_empty((size, *like.shape[1:]))
        ubuf = like_unit.new_empty((size, like_unit.shape[1]))
        if k:
            buf[:k], ubuf[:k] = self._entries[:k], self._unit[:k]
        self._entries, self._unit = buf, ubuf
        for key, rows in self._rows_cache.items():
            grown = rows.new_empty((size, rows.shape[1]))
            grown[:k] = rows[:k]
            self._rows_cache[key] = grown

    def _add_adaptive(self, new: torch.Tensor, u_new: torch.Tensor, new_rows: torch.Tensor | None) -> torch.Tensor:
        """``new`` (n, ...) entries, ``u_new`` (n, d) their float64 unit rows, ``new_rows`` None or
        their `unit_rows` in their own dtype/device with COS_EPS. Stores them and returns their Gram rows
        (n, K+n) in slot order, on the device, for `_finish`."""
        k, n = len(self), new.shape[0]
        if self._age is None:
            self._age, self._gram, self._rowsum = np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros(0)
        self._reserve(k + n, new, u_new)
        self._entries[k:k + n], self._unit[k:k + n] = new, u_new
        # Rows normalise independently: normalising only the new ones gives the same cached numbers.
        for (dtype, device, eps), rows in self._rows_cache.items():
            same = new_rows is not None and (dtype, device, eps) == (new.dtype, new.device, COS_EPS)
            rows[k:k + n] = new_rows if same else _normalised(new, dtype, device, eps)
        self._pending = (k, n)
        return u_new @ self._unit[:k + n].T  # (n, K+n) in slot order: the only O(d) work

    def _finish(self, rows: torch.Tensor) -> None:
        """The CPU bookkeeping of an adaptive `_add`: ``rows`` are `_add_adaptive`'s Gram rows, on the CPU."""
        (k, n), self._pending = self._pending, None
        total = k + n
        order = np.concatenate([self._age, np.arange(k, total)])  # (K+n,) slots, oldest first
        g_rows = rows.numpy()
        gram = np.empty((total, total))  # slot order
        gram[:k, :k] = self._gram
        # Mirror the new rows as columns so the matrix stays exactly symmetric.
        gram[:k, k:] = g_rows[:, :k].T
        gram[k:] = g_rows
        # Sums in torch (NumPy's summation order differs; ties are decided on these values): an old
        # entry's sum gains the new cosines (one new row, the usual case per class and step, needs no
        # sum), a new row's sum is taken oldest first.
        rowsum = np.empty(total)
        gained = g_rows[0, :k] if n == 1 else rows[:, :k].sum(dim=0).numpy()
        np.add(self._rowsum, gained, out=rowsum[:k])
        rowsum[k:] = rows.index_select(1, torch.from_numpy(order)).sum(dim=1).numpy()

        if total <= self.capacity:
            self._age, self._gram, self._rowsum = order, gram, rowsum
            return
        # The greedy eviction runs oldest first, so "first index on ties" means the oldest entry.
        g = _square_take(gram, order)
        scores = rowsum[order]
        alive = np.ones(total, dtype=bool)
        for _ in range(total - self.capacity):
            top = scores.max()
            j = int(np.flatnonzero(scores >= top - TIE_TOL)[0])  # first index among (near-)ties
            alive[j] = False
            # Removing m_j removes cos(m_i, m_j) from every remaining row sum: O(K).
            scores -= g[:, j]
            scores[j] = -np.inf
        kept = order[alive]  # (capacity,) slots, oldest first
        rowsum[kept] = scores[alive]
        # Refill the freed slots below `capacity` with the surviving slots above it (at most n rows).
        cap = self.capacity
        free = np.ones(cap, dtype=bool)
        free[kept[kept < cap]] = False
        holes, movers = np.flatnonzero(free), np.sort(kept[kept >= cap])
        layout = np.arange(cap)  # layout[new slot] = old slot
        layout[holes] = movers
        for dst, src in zip(holes.tolist(), movers.tolist()):  # usually one: per-row copies beat gathers
            for buf in (self._entries, self._unit, *self._rows_cache.values()):
                buf[dst] = buf[src]
        new_slot = np.empty(total, dtype=np.int64)
        new_slot[layout] = np.arange(cap)
        self._age = new_slot[kept]
        self._gram = _square_take(gram, layout)
        self._rowsum = rowsum[layout]

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically, derived state included (its rounding
        history matters for ties, so it is saved rather than recomputed). Oldest first; "slots"
        (adaptive) says where each entry is stored: a matrix product's rounding may depend on a row's
        position, so a resumed run restores the layout too."""
        unit = gram = rowsum = slots = None
        rows = []
        if self._age is not None:
            age = self._age
            unit = self._unit.index_select(0, torch.from_numpy(age).to(self._unit.device))
            gram = torch.from_numpy(_square_take(self._gram, age))
            rowsum = torch.from_numpy(self._rowsum[age])
            slots = torch.from_numpy(age.copy())
            # The normalised rows the losses read were written batch by batch as entries came in; a row norm's
            # rounding can depend on how many rows one kernel reduces (on CUDA it does), so recomputing them
            # all at once on resume would not give the same bits: they are saved too.
            for (dtype, _, eps), cached in self._rows_cache.items():
                taken = cached.index_select(0, torch.from_numpy(age).to(cached.device))
                rows.append({"dtype": str(dtype).removeprefix("torch."), "eps": eps, "rows": taken})
        entries = None if self._entries is None else self.tensor().clone()
        return {
            "capacity": self.capacity,
            "strategy": self.strategy,
            "entry_shape": None if self._entry_shape is None else list(self._entry_shape),
            "entries": entries,
            "unit": unit,
            "gram": gram,
            "rowsum": rowsum,
            "slots": slots,
            "rows": rows,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity or state["strategy"] != self.strategy:
            raise UserError(
                f"saved memory has capacity {state['capacity']} / strategy {state['strategy']!r}, "
                f"this run asks for capacity {self.capacity} / strategy {self.strategy!r}; "
                "resume with the same memory settings"
            )
        shape = state["entry_shape"]
        self._entry_shape = None if shape is None else tuple(shape)
        self._rows_cache = {}
        entries = state.get("entries")
        self._entries = None if entries is None else entries.clone()
        self._unit = self._gram = self._rowsum = self._age = None
        if self.strategy == "fifo" or entries is None:
            return
        if state.get("gram") is None or state.get("unit") is None:
            raise ValueError("adaptive memory state lacks its Gram matrix; it cannot be resumed exactly")
        # A checkpoint may have been mapped elsewhere: unit rows go with the entries, the rest to the CPU.
        self._unit = state["unit"].to(self._entries.device, copy=True)
        self._gram = state["gram"].cpu().numpy().copy()
        self._rowsum = state["rowsum"].cpu().numpy().copy()
        self._age = np.arange(entries.shape[0])
        if state.get("slots") is not None:  # back into the saved layout (states without it: oldest first)
            age = state["slots"].cpu().numpy().astype(np.int64)
            at = torch.from_numpy(age).to(self._entries.device)
            self._entries[at] = entries.to(self._entries.device)
            self._unit[at] = state["unit"].to(self._unit.device)
            gram = np.empty_like(self._gram)
            gram[np.ix_(age, age)] = self._gram
            self._gram, self._age = gram, age
            self._rowsum[age] = state["rowsum"].cpu().numpy()
        device = self._entries.device
        for saved in state.get("rows") or ():  # states without them rebuild the rows on first use
            dtype = getattr(torch, saved["dtype"], None)
            if not isinstance(dtype, torch.dtype) or saved["rows"].shape[0] != entries.shape[0]:
                raise ValueError("adaptive memory state holds malformed normalised rows; it cannot be resumed")
            full = saved["rows"].new_empty((self._entries.shape[0], saved["rows"].shape[1]), device=device)
            full[torch.from_numpy(self._age).to(device)] = saved["rows"].to(device)
            self._rows_cache[(dtype, device, float(saved["eps"]))] = full


class ClassMemories:
    """A real and a generated MemoryBank per class, created on first use."""

    def __init__(self, num_classes: int, capacity_real: int, capacity_gen: int, strategy: str):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.capacity_real = check_capacity(capacity_real, "capacity_real")
        self.capacity_gen = check_capacity(capacity_gen, "capacity_gen")
        self.strategy = check_strategy(strategy)
        self._real: dict[int, MemoryBank] = {}
        self._gen: dict[int, MemoryBank] = {}

    def _check_class(self, c: int) -> int:
        c = int(c)
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class {c} out of range 0..{self.num_classes - 1}")
        return c

    def real(self, c: int) -> MemoryBank:
        c = self._check_class(c)
        if c not in self._real:
            self._real[c] = MemoryBank(self.capacity_real, self.strategy)
        return self._real[c]

    def gen(self, c: int) -> MemoryBank:
        c = self._check_class(c)
        if c not in self._gen:
            self._gen[c] = MemoryBank(self.capacity_gen, self.strategy)
        return self._gen[c]

    @torch.no_grad()
    def update(self, labels: torch.Tensor, z_clean: torch.Tensor, z_pred: torch.Tensor) -> None:
        """Insert this batch: per class present, clean latents (N, ...) into real, predictions into gen."""
        if not (labels.shape[0] == z_clean.shape[0] == z_pred.shape[0]):
            raise ValueError(
                f"batch sizes differ: labels {labels.shape[0]}, z_clean {z_clean.shape[0]}, z_pred {z_pred.shape[0]}"
            )
        if labels.shape[0] == 0:
            return
        # One stable sort makes each class a contiguous run (batch order kept inside it), so the
        # per-class pieces are views; classes are taken ascending, so insertion order is deterministic.
        # The labels are the one device-to-host read besides the Gram rows below.
        sizes = collections.Counter(labels.tolist())
        order = torch.argsort(labels, stable=True)
        pieces = [z_clean.detach().index_select(0, order), z_pred.detach().index_select(0, order)]
        if self.strategy == "adaptive":  # rows normalise independently: once for all classes
            pieces += [_unit_rows(pieces[0]), _unit_rows(pieces[1])]
            pieces += [_normalised(x, x.dtype, x.device, COS_EPS) for x in pieces[:2]]
        start = 0
        pending: list[tuple[MemoryBank, torch.Tensor]] = []
        for c in sorted(sizes):
            n = sizes[c]
            real, gen, *extra = (p[start:start + n] for p in pieces)
            for bank, part, more in ((self.real(c), real, extra[0::2]), (self.gen(c), gen, extra[1::2])):
                rows = bank._begin(part, *more)  # (unit, rows) for adaptive, nothing for fifo
                if rows is not None:
                    pending.append((bank, rows))
            start += n
        if pending:  # every bank's new Gram rows in one device-to-host transfer, then the CPU bookkeeping
            host = torch.cat([rows.reshape(-1) for _, rows in pending]).cpu()
            if not np.isfinite(host.numpy()).all():  # on the host already: the check costs no sync
                raise NonFiniteEntry("a new memory entry holds NaN or infinity (its cosines are not finite)")
            at = 0
            for bank, rows in pending:
                bank._finish(host[at:at + rows.numel()].view(rows.shape).clone())
                at += rows.numel()

    def sizes(self) -> dict[int, dict[str, int]]:
        """{class: {"real": n, "gen": n}} for every class (0 where never filled)."""
        return {
            c: {"real": len(self._real.get(c, ())), "gen": len(self._gen.get(c, ()))}
            for c in range(self.num_classes)
        }

    def state_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "capacity_real": self.capacity_real,
            "capacity_gen": self.capacity_gen,
            "strategy": self.strategy,
            "real": {c: bank.state_dict() for c, bank in sorted(self._real.items())},
            "gen": {c: bank.state_dict() for c, bank in sorted(self._gen.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        saved = (state["num_classes"], state["capacity_real"], state["capacity_gen"], state["strategy"])
        ours = (self.num_classes, self.capacity_real, self.capacity_gen, self.strategy)
        if saved != ours:
            raise UserError(
                "saved memories were made with (num_classes, capacity_real, capacity_gen, strategy) = "
                f"{saved}, this run asks for {ours}; resume with the same memory settings"
            )
        self._real, self._gen = {}, {}
        for c, bank_state in state["real"].items():
            self.real(int(c)).load_state_dict(bank_state)
        for c, bank_state in state["gen"].items():
            self.gen(int(c)).load_state_dict(bank_state)
