"""The truth value of a one-element buffer (a phase flag), read on the host only when it changed."""

from typing import Optional, Tuple

from torch import Tensor


class HostFlag:
    """bool(buffer), read from the device only when the buffer changed (a new tensor, or an in-place
    write such as a phase switch or a checkpoint load): reading a GPU tensor makes the host wait for
    the GPU, and a flag that decides the routing is asked on every forward."""

    def __init__(self):
        self._cached: Optional[Tuple[Tensor, int, bool]] = None

    def __deepcopy__(self, memo) -> "HostFlag":
        # a copied module (copy.deepcopy, fairseq's --ema) gets new buffers whose version counters
        # restart: a copied cache could match one of them after a write and answer the old value
        return HostFlag()

    def __call__(self, buf: Tensor) -> bool:
        cached = self._cached
        if cached is None or cached[0] is not buf or cached[1] != buf._version:
            cached = self._cached = (buf, buf._version, bool(buf))
        return cached[2]
