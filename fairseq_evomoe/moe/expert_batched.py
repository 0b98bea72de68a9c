"""The experts' static-shape path: every expert's FFN as one batched matmul per projection over
[E, max_rows, M] slots, with no host read (the slot of each row is computed on the device).

The rows come grouped by expert (counts[e] rows for expert e, on the device), followed by rows that
belong to no expert (assignments not kept), whose output is 0. Each expert's rows fill the first
counts[e] of its max_rows slots; the other slots hold zeros and are computed and discarded, the
price of static shapes (max_rows is the capacity bound, so about (capacity factor - 1) of the
compute). This is how a dropping MoE layer runs where torch's grouped matmul is not available.
"""

from typing import Sequence

import torch
from torch import Tensor

from .expert_grouped_mm import matmul_dtype


def batched_ffn(x: Tensor, counts: Tensor, max_rows: int, params: Sequence[Tensor], activation_fn, dropout) -> Tensor:
    """x [P, M] grouped by expert, counts [E] (sum <= P, each <= max_rows) -> [P, M_out]."""
    w1, b1, w2, b2 = params
    dtype = matmul_dtype(x)
    if x.dtype != dtype:  # under autocast: differentiable casts, as autocast's
        x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    num_experts, rows = w1.shape[0], x.shape[0]
    counts = counts.to(x.device)
    starts = torch.cumsum(counts, 0) - counts
    # the row in each slot [E, max_rows]; an empty slot reads the zero row appended at index P
    j = torch.arange(max_rows, device=x.device)
    src = torch.where(j < counts[:, None], starts[:, None] + j, rows).reshape(-1)
    xs = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, src).view(num_experts, max_rows, -1)
    h = dropout(activation_fn(torch.baddbmm(b1.unsqueeze(1), xs, w1.transpose(1, 2))))
    ys = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)).reshape(num_experts * max_rows, -1)
    # the slot of each row; a row past the grouped ones reads the zero row appended after the slots
    r = torch.arange(rows, device=x.device)
    expert = torch.searchsorted(starts + counts, r, right=True)
    slot = expert * max_rows + r - starts.index_select(0, expert.clamp(max=num_experts - 1))
    slot = torch.where(expert < num_experts, slot, num_experts * max_rows)
    return torch.cat([ys, ys.new_zeros(1, ys.shape[1])]).index_select(0, slot)
