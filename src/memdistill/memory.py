"""Per-class memories of latents and their eviction strategies (METHOD.md section 4).

"adaptive" (the paper): append, then while over capacity evict the entry whose summed cosine
similarity to the whole memory (diagonal included) is largest, i.e. the most redundant one.
"fifo" (Minimax): evict the oldest entries.

The adaptive bank keeps the unit-normalised entries, their Gram (cosine) matrix and its row
sums between updates, so an update costs O(n (K + n) d) for the new Gram rows plus O(K) per
eviction, instead of O(K^2 d) per eviction for the recompute-from-scratch rule
(`naive_adaptive_keep`, kept as the reference for tests and benchmarks).
"""

from __future__ import annotations

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


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Flatten to rows and normalise in float64; zero rows stay zero (norm clamped at eps)."""
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)  # (N, d)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(COS_EPS)


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


class MemoryBank:
    """One class's memory: up to `capacity` latents of one shape, oldest first.

    Entries are detached copies with the dtype/device of the first batch added (later batches
    are converted to it). `tensor()` returns a tensor that later updates never modify in place.
    """

    def __init__(self, capacity: int, strategy: str):
        self.capacity = check_capacity(capacity)
        self.strategy = check_strategy(strategy)
        self._entries: torch.Tensor | None = None  # (K, *entry_shape)
        self._entry_shape: tuple[int, ...] | None = None
        # adaptive only, float64. The normalised entries stay on the entries' device (the O(d)
        # work); the small Gram matrix and row sums live on the CPU so the eviction loop's
        # many tiny steps need no device round trip each.
        self._unit: torch.Tensor | None = None  # (K, d) normalised entries
        self._gram: torch.Tensor | None = None  # (K, K) cosines, CPU
        self._rowsum: torch.Tensor | None = None  # (K,) s_k = sum_j cos(m_k, m_j), CPU

    def __len__(self) -> int:
        return 0 if self._entries is None else self._entries.shape[0]

    @property
    def entry_shape(self) -> tuple[int, ...] | None:
        return self._entry_shape

    def tensor(self) -> torch.Tensor:
        """Current entries (K, *entry_shape), oldest first."""
        if self._entries is not None:
            return self._entries
        if self._entry_shape is not None:
            return torch.empty((0, *self._entry_shape))
        return torch.empty((0,))

    def add(self, latents: torch.Tensor) -> None:
        """Append a batch (N, *entry_shape), then evict down to capacity."""
        if latents.dim() < 1:
            raise ValueError("MemoryBank.add expects a batch (N, ...), got a scalar")
        shape = tuple(latents.shape[1:])
        if self._entry_shape is None:
            self._entry_shape = shape
        elif shape != self._entry_shape:
            raise ValueError(f"memory entries have shape {self._entry_shape}, got a batch of {shape}")
        if latents.shape[0] == 0:
            return
        new = latents.detach()
        if self._entries is None:
            new = new.clone()
        else:
            new = new.to(dtype=self._entries.dtype, device=self._entries.device)
        if self.strategy == "fifo":
            self._add_fifo(new)
        else:
            self._add_adaptive(new)

    def _add_fifo(self, new: torch.Tensor) -> None:
        merged = new if self._entries is None else torch.cat([self._entries, new])
        self._entries = merged[-self.capacity:] if merged.shape[0] > self.capacity else merged

    def _add_adaptive(self, new: torch.Tensor) -> None:
        u_new = _unit_rows(new)  # (n, d)
        if self._entries is None:
            entries, unit = new, u_new
            gram = (u_new @ u_new.T).cpu()  # (n, n)
            rowsum = gram.sum(dim=1)
        else:
            k_old = self._entries.shape[0]
            entries = torch.cat([self._entries, new])
            unit = torch.cat([self._unit, u_new])  # (K+n, d)
            rows = (u_new @ unit.T).cpu()  # (n, K+n): the only O(d) work of the update
            # Mirror the new rows as columns so the matrix stays exactly symmetric.
            top = torch.cat([self._gram, rows[:, :k_old].T], dim=1)  # (K, K+n)
            gram = torch.cat([top, rows])  # (K+n, K+n)
            rowsum = torch.cat([self._rowsum + rows[:, :k_old].sum(dim=0), rows.sum(dim=1)])

        total = entries.shape[0]
        if total > self.capacity:
            alive = torch.ones(total, dtype=torch.bool)
            scores = rowsum.clone()
            for _ in range(total - self.capacity):
                k = _first_argmax(scores)
                alive[k] = False
                # Removing m_k removes cos(m_j, m_k) from every remaining row sum: O(K).
                scores -= gram[:, k]
                scores[k] = float("-inf")
            keep = torch.nonzero(alive)[:, 0]  # (capacity,), ascending: order is kept
            # index_select: plain advanced indexing is several times slower on CPU here.
            gram = gram.index_select(0, keep).index_select(1, keep)
            rowsum = scores.index_select(0, keep)
            keep = keep.to(entries.device)
            entries, unit = entries.index_select(0, keep), unit.index_select(0, keep)
        self._entries, self._unit, self._gram, self._rowsum = entries, unit, gram, rowsum

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically, derived state included (its rounding
        history matters for ties, so it is saved rather than recomputed)."""
        return {
            "capacity": self.capacity,
            "strategy": self.strategy,
            "entry_shape": None if self._entry_shape is None else list(self._entry_shape),
            "entries": None if self._entries is None else self._entries.clone(),
            "unit": None if self._unit is None else self._unit.clone(),
            "gram": None if self._gram is None else self._gram.clone(),
            "rowsum": None if self._rowsum is None else self._rowsum.clone(),
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

        def _copy(key: str) -> torch.Tensor | None:
            value = state.get(key)
            return None if value is None else value.clone()

        self._entries = _copy("entries")
        self._unit, self._gram, self._rowsum = _copy("unit"), _copy("gram"), _copy("rowsum")
        # A checkpoint may have been mapped elsewhere: put each piece back where add() expects it.
        if self._unit is not None and self._entries is not None:
            self._unit = self._unit.to(self._entries.device)
        if self._gram is not None:
            self._gram, self._rowsum = self._gram.cpu(), self._rowsum.cpu()
        if self.strategy == "adaptive" and self._entries is not None and self._gram is None:
            raise ValueError("adaptive memory state lacks its Gram matrix; it cannot be resumed exactly")


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
        for c in torch.unique(labels).tolist():  # sorted, so insertion order is deterministic
            mask = labels == c
            self.real(c).add(z_clean[mask])
            self.gen(c).add(z_pred[mask])

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
