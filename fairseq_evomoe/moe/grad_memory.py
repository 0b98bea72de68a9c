"""Reuse of the experts' weight-gradient memory from one backward to the next (CPU).

Relies on one private torch API, `torch._C._storage_Use_Count` (listed in fairseq_evomoe/patches.py):
without it the memory is simply never reused.
"""

from typing import Dict

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
    memory stays allocated between steps instead of only during them. What a handed-out tensor
    holds is undefined: the backward writes every slot of it, zeros included, since whatever held
    it as `p.grad` may have written into it (a data-parallel all-reduce copies the other workers'
    gradients into slots this worker left at zero).

    Owned by one ExpertFFNs module; copies of the module start empty.
    """

    def __init__(self):
        self._kept: Dict[str, Tensor] = {}

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
        return self._kept[name].detach()

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
        return {"_kept": {}}
