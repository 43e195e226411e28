"""Per-row context caches: a fixed pool of slots, kept dense.

The live rows always occupy slots [0, n). A finished row's slot is refilled by moving the last live
row into it (one row copied), so the common case -- every live row takes part in a forward -- is a
slice of the pool (views, no copy). A forward over a scattered subset of rows works on a copy that
is written back afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.twotower import TowerState, TwoTower


class SlotPool:
    def __init__(self, model: TwoTower, rows: int, capacity: int = 256):
        self.state = model.new_state(rows, capacity=capacity)
        self.rows = rows
        self.n = 0  # live rows occupy slots [0, n)

    @property
    def device(self) -> torch.device:
        return self.state.lengths.device

    def free(self) -> int:
        return self.rows - self.n

    def _is_prefix(self, slots: list[int]) -> bool:
        return slots == list(range(len(slots)))

    def view(self, slots: list[int], need: int = 0) -> TowerState:
        """The state of `slots`, with room for `need` positions. A prefix of the pool is a view
        (tensors sliced along rows, so in-place K/V writes land in the pool); otherwise a copy."""
        self.state.ensure_capacity(need)
        if self._is_prefix(slots):
            m = len(slots)
            st = TowerState(self.state.lengths[:m])
            for src, dst in zip(self.state.tensors(), st.tensors()):
                for i, t in src.items():
                    dst[i] = t[:m]
            return st
        return self.state.select(torch.tensor(slots, device=self.device))

    def write_back(self, slots: list[int], sub: TowerState) -> None:
        """Store what a forward changed in `sub` (from `view(slots)`) back into the pool."""
        idx = torch.tensor(slots, device=self.device)
        if self._is_prefix(slots):
            m = len(slots)
            # K/V were written in place through the views; conv/ssm/lengths are new tensors.
            self.state.lengths[:m] = sub.lengths
            for dst, src in ((self.state.conv, sub.conv), (self.state.ssm, sub.ssm)):
                for i, t in src.items():
                    dst[i][:m] = t
            for dst, src in ((self.state.k, sub.k), (self.state.v, sub.v)):
                for i, t in src.items():
                    if i not in dst or t.data_ptr() != dst[i].data_ptr():
                        self._put_kv(dst, i, idx, t)
            return
        self.state.assign(idx, sub)

    def _put_kv(self, dst: dict[int, Tensor], i: int, idx: Tensor, t: Tensor) -> None:
        if i not in dst:
            shape = (self.rows, t.shape[1], max(t.shape[2], 16), t.shape[3])
            dst[i] = t.new_zeros(shape)
        self.state.ensure_capacity(t.shape[2])
        dst[i][idx, :, : t.shape[2]] = t

    def admit(self, sub: TowerState) -> list[int]:
        """Place freshly prefilled rows into the next free slots; returns their slots."""
        m = sub.batch
        if m > self.free():
            raise RuntimeError("no free slots")
        slots = list(range(self.n, self.n + m))
        self.n += m
        for i, t in sub.k.items():
            if i not in self.state.k:
                self._put_kv(self.state.k, i, torch.tensor(slots, device=self.device), t)
                self._put_kv(self.state.v, i, torch.tensor(slots, device=self.device), sub.v[i])
        self.state.assign(torch.tensor(slots, device=self.device), sub)
        return slots

    def release(self, slots: list[int]) -> dict[int, int]:
        """Free `slots`; live rows moved to keep the pool dense are returned as {old: new}."""
        freed = set(slots)
        n_new = self.n - len(freed)
        holes = sorted(s for s in freed if s < n_new)
        movers = [s for s in range(n_new, self.n) if s not in freed]
        if movers:
            src = self.state.select(torch.tensor(movers, device=self.device))
            self.state.assign(torch.tensor(holes, device=self.device), src)
        self.n = n_new
        return dict(zip(movers, holes))
