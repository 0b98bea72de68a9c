"""Reuse of the experts' weight-gradient memory from one backward to the next (CPU).

Relies on one private torch API, `torch._C._storage_Use_Count` (listed in fairseq_evomoe/patches.py):
without it the memory is simply never reused.
"""

from typing import Dict, List

import torch
from torch import Tensor


class ReusableGradStorage:
    """Reuses the memory of the experts' weight gradients from one backward to the next (CPU).

    An expert weight gradient is E times a dense layer's, and fairseq frees it after every step
    (`zero_grad` sets `p.grad = None`). glibc serves allocations that large with a fresh mmap, so
    every backward faulted in and zeroed all of those pages again, a large share of a CPU step
    (docs/benchmarks.md). This keeps the last storage handed out and hands it out
    again only when nothing else refers to it any more, the same test torch's autograd applies
    before it accumulates into a gradient in place; a gradient still held anywhere (as `p.grad`
    during gradient accumulation, or kept by the caller) is never written to. The price is that the
    memory stays allocated between steps instead of only during them.

    Owned by one ExpertFFNs module; copies of the module start empty.
    """

    def __init__(self):
        self._kept: Dict[str, Tensor] = {}
        self._zero_slots: Dict[str, set] = {}  # slots of a kept tensor that the last backward left at 0

    def new_like(self, name: str, like: Tensor) -> Tensor:
        kept = self._kept.get(name)
        if (
            kept is not None
            and kept.shape == like.shape
            and kept.dtype == like.dtype
            and kept.device == like.device
            and self._only_holder(kept)
        ):
            return kept.detach()  # a new tensor on the same storage, so that autograd can adopt it
        self._kept[name] = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._zero_slots[name] = set()
        return self._kept[name].detach()

    def zero_slots(self, name: str, grad: Tensor, slots: List[int]) -> None:
        """grad[e] = 0 for the experts e in `slots` (those without tokens), skipping the ones that
        are still 0 from the last backward: a gradient is only ever scaled in place once handed
        out (clipping, loss scaling, all-reduce of zeros), so its zeros stay zeros. When one expert
        runs alone as a dense FFN, this saves writing E - 1 zero slots per weight every step."""
        known = self._zero_slots.get(name, set())
        for e in slots:
            if e not in known:
                grad[e].zero_()
        self._zero_slots[name] = set(slots)

    @staticmethod
    def _only_holder(t: Tensor) -> bool:
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if use_count is None:  # a torch without the counter: never reuse
            return False
        storage = t.untyped_storage()  # this Python handle counts as one holder, `t` as the other
        return use_count(storage._cdata) <= 2

    def __deepcopy__(self, memo):
        return ReusableGradStorage()

    def __getstate__(self):
        return {"_kept": {}, "_zero_slots": {}}
