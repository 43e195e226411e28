"""Per-row context caches: a fixed pool of slots, kept dense, and the denoiser's view of them.

The live rows always occupy slots [0, n). A finished row's slot is refilled by moving the last live
row into it (one row copied), so the common case -- every live row takes part in a forward -- is a
slice of the pool (views, no copy). A forward over a scattered subset of rows works on a copy that
is written back afterwards.

With the towers on two devices the denoiser reads a mirror of the context state on its own device.
The mirror is updated incrementally: after a context commit only the new positions' K/V and the
committed rows' conv/SSM states cross devices, never the whole cache (the release clones it whole
once per block).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.twotower import TowerState, TwoTower


def _views(st: TowerState, m: int) -> TowerState:
    """Rows [0, m) of `st` as views (in-place K/V writes land in `st`)."""
    out = TowerState(st.lengths[:m])
    for src, dst in zip(st.tensors(), out.tensors()):
        for i, t in src.items():
            dst[i] = t[:m]
    return out


class SlotPool:
    def __init__(self, model: TwoTower, rows: int, capacity: int = 256, den_device: torch.device | None = None,
                 mirror: bool | None = None):
        self.state = model.new_state(rows, capacity=capacity)
        self.rows = rows
        self.n = 0  # live rows occupy slots [0, n)
        ctx = self.state.lengths.device
        den = torch.device(den_device) if den_device is not None else ctx
        # A mirror exists when the denoiser lives elsewhere (or when a test asks for one).
        self.mirror = model.new_state(rows, capacity=capacity, device=den) if (mirror or den != ctx) else None

    @property
    def device(self) -> torch.device:
        return self.state.lengths.device

    def free(self) -> int:
        return self.rows - self.n

    @staticmethod
    def _is_prefix(slots: list[int]) -> bool:
        return slots == list(range(len(slots)))

    def _idx(self, slots: list[int], st: TowerState | None = None) -> Tensor:
        return torch.tensor(slots, device=(st or self.state).lengths.device)

    def reserve(self, need: int) -> None:
        """Make room for `need` positions in every row (before forwards run, never during)."""
        self.state.ensure_capacity(need)
        if self.mirror is not None:
            self.mirror.ensure_capacity(need)

    def view(self, slots: list[int], need: int = 0) -> TowerState:
        """The context-side state of `slots`, with room for `need` positions: a view when `slots`
        is a prefix of the pool, else a copy (to be stored with `write_back`)."""
        self.state.ensure_capacity(need)
        if self._is_prefix(slots):
            return _views(self.state, len(slots))
        return self.state.select(self._idx(slots))

    def den_view(self, slots: list[int]) -> TowerState:
        """What the denoiser reads for `slots` (read only): the mirror when there is one."""
        st = self.mirror if self.mirror is not None else self.state
        return _views(st, len(slots)) if self._is_prefix(slots) else st.select(self._idx(slots, st))

    def write_back(self, slots: list[int], sub: TowerState, old_lengths: Tensor, n: int) -> None:
        """Store what a context forward of `n` tokens changed in `sub` (from `view(slots)`)."""
        idx = self._idx(slots)
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
                        self._put_kv(self.state, dst, i, idx, t)
        else:
            self.state.assign(idx, sub)
        self._mirror_rows(slots, sub, old_lengths, n)

    def _mirror_rows(self, slots: list[int], sub: TowerState, start: Tensor, n: int) -> None:
        """Copy the rows' new positions [start, start + n) and their states to the mirror."""
        if self.mirror is None:
            return
        mir, dev = self.mirror, self.mirror.lengths.device
        idx = self._idx(slots, mir)
        mir.lengths[idx] = sub.lengths.to(dev)
        for dst, src in ((mir.conv, sub.conv), (mir.ssm, sub.ssm)):
            for i, t in src.items():
                dst[i][idx] = t.to(dev, non_blocking=True)
        if n == 0 or not sub.k:
            return
        pos = start.to(sub.lengths.device)[:, None] + torch.arange(n, device=sub.lengths.device)  # (m, n)
        rows = torch.arange(len(slots), device=sub.lengths.device)[:, None]
        for dst, src in ((mir.k, sub.k), (mir.v, sub.v)):
            for i, t in src.items():
                new = t[rows, :, pos].to(dev, non_blocking=True)  # (m, n, Hkv, D): only what changed
                if i not in dst:
                    self._put_kv(mir, dst, i, idx, t.new_zeros(t.shape[0], t.shape[1], 16, t.shape[3]).to(dev))
                mir.ensure_capacity(int(pos.max()) + 1)
                dst[i][idx[:, None], :, pos.to(dev)] = new

    def _put_kv(self, st: TowerState, dst: dict[int, Tensor], i: int, idx: Tensor, t: Tensor) -> None:
        if i not in dst:
            dst[i] = t.new_zeros((self.rows, t.shape[1], max(t.shape[2], 16), t.shape[3]))
        st.ensure_capacity(t.shape[2])
        dst[i][idx, :, : t.shape[2]] = t

    def admit(self, sub: TowerState) -> list[int]:
        """Place freshly prefilled rows into the next free slots; returns their slots."""
        m = sub.batch
        if m > self.free():
            raise RuntimeError("no free slots")
        slots = list(range(self.n, self.n + m))
        self.n += m
        idx = self._idx(slots)
        for i, t in sub.k.items():
            if i not in self.state.k:
                self._put_kv(self.state, self.state.k, i, idx, t)
                self._put_kv(self.state, self.state.v, i, idx, sub.v[i])
        self.state.assign(idx, sub)
        zero = torch.zeros(m, dtype=torch.long, device=self.device)
        self._mirror_rows(slots, sub, zero, int(sub.lengths.max()) if m else 0)
        return slots

    def release(self, slots: list[int]) -> dict[int, int]:
        """Free `slots`; live rows moved to keep the pool dense are returned as {old: new}."""
        freed = set(slots)
        n_new = self.n - len(freed)
        holes = sorted(s for s in freed if s < n_new)
        movers = [s for s in range(n_new, self.n) if s not in freed]
        if movers:
            for st in (self.state, self.mirror):
                if st is not None:
                    st.assign(self._idx(holes, st), st.select(self._idx(movers, st)))
        self.n = n_new
        return dict(zip(movers, holes))
