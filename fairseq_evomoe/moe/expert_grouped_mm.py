"""The experts' GPU compute path: torch's grouped matmul (`torch.nn.functional.grouped_mm`), one
call per projection over all experts' groups, with group sizes read on the device (no host wait).
"""

import functools
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Counts = Union[Tensor, Sequence[int]]  # rows per expert


class _AddGroupBias(torch.autograd.Function):
    """h[rows of expert e] += bias[e], in place; the bias gradient is a sum of rows per group (a
    gather with index_select would make its backward a [tokens x width] scatter-add)."""

    @staticmethod
    def forward(ctx, h: Tensor, bias: Tensor, expert_of_row: Tensor):
        ctx.save_for_backward(expert_of_row)
        ctx.num_experts = bias.shape[0]
        ctx.mark_dirty(h)
        return h.add_(bias.index_select(0, expert_of_row))

    @staticmethod
    def backward(ctx, grad: Tensor):
        expert_of_row, = ctx.saved_tensors
        grad = grad.contiguous()  # grouped_mm's backward rejects broadcast gradients (e.g. of y.sum())
        return grad, group_sums(grad, expert_of_row, ctx.num_experts), None


def group_sums(t: Tensor, group_of_row: Tensor, num_groups: int) -> Tensor:
    """[G, N]: the sum of t's rows per group, for rows sorted by group (group_of_row
    non-decreasing). Deterministic, with fp32 accumulation as torch.sum. On a GPU one matmul
    against the one-hot group matrix, where a sum per group would launch G kernels; on the CPU
    the sum per group, where the matmul would cost G times the arithmetic."""
    if t.device.type == "cpu":
        counts = torch.bincount(group_of_row, minlength=num_groups).tolist()
        return torch.stack([g.sum(0) for g in t.split(counts)])
    one_hot = group_of_row.unsqueeze(0) == torch.arange(num_groups, device=t.device).unsqueeze(1)
    return one_hot.to(t.dtype) @ t


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's (fairseq's --amp) where it is on, else x's own.
    torch.nn.functional.grouped_mm has no autocast rule, so the grouped path casts to it itself."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def grouped_mm_supported(x: Tensor) -> bool:
    """Whether torch.nn.functional.grouped_mm (torch >= 2.9) runs on x's device and dtype: always on
    the CPU; on a GPU, tried once per device and dtype (torch has a CUTLASS kernel for bf16 on Hopper
    and newer, and, in recent versions, a slower fallback for other dtypes and GPUs)."""
    if not hasattr(F, "grouped_mm"):
        return False
    return x.device.type == "cpu" or _grouped_mm_runs(x.device, matmul_dtype(x))


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a, b = torch.zeros(16, 16, device=device, dtype=dtype), torch.zeros(2, 16, 16, device=device, dtype=dtype)
        F.grouped_mm(a, b, offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def grouped_mm_preferred(x: Tensor, num_experts: int) -> bool:
    """Whether the experts run through torch's grouped matmul: always on the CPU when it exists
    (with activation dropout, which the CPU kernel lacks); on a GPU where it has its fast kernel
    (bf16 on Hopper and newer), and elsewhere from 16 experts up, where its fallback kernel beat
    per-expert matmuls on an H100 while at 4 experts they were faster (docs/benchmarks.md 2.3).
    Otherwise the experts run batched (expert_batched.py)."""
    if not grouped_mm_supported(x):
        return False
    if x.device.type == "cpu":
        return True
    if matmul_dtype(x) == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9:
        return True
    return num_experts >= 16


def grouped_ffn(x: Tensor, counts: Counts, params: Sequence[Tensor], activation_fn, dropout) -> Tensor:
    """Every expert's FFN on its contiguous group of x's rows: both projections as single grouped
    matmuls, with no host sync (group offsets and the expert of each row are computed on x's
    device). Rows after the groups (sum(counts) < rows) are computed with the last group, for
    static shapes, and output 0. `dropout` is the activation dropout function (identity when off)."""
    w1, b1, w2, b2 = params
    dtype = matmul_dtype(x)
    if x.dtype != dtype:  # under autocast: the weights' casts are differentiable, as autocast's are
        x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    num_experts = w1.shape[0]
    sizes = counts.to(x.device) if isinstance(counts, Tensor) else torch.tensor(counts, device=x.device)
    grouped = sizes.sum()
    sizes = torch.cat([sizes[:-1], (x.shape[0] - sizes[:-1].sum()).view(1)])  # the last group takes the rest
    offsets = torch.cumsum(sizes, 0, dtype=torch.int32)
    experts = torch.arange(num_experts, device=x.device)
    expert_of_row = torch.repeat_interleave(experts, sizes, output_size=x.shape[0])
    h = F.grouped_mm(x, w1.transpose(1, 2), offs=offsets)
    h = _AddGroupBias.apply(h, b1, expert_of_row)
    h = dropout(activation_fn(h))
    y = _AddGroupBias.apply(F.grouped_mm(h, w2.transpose(1, 2), offs=offsets), b2, expert_of_row)
    return torch.where(torch.arange(x.shape[0], device=x.device)[:, None] < grouped, y, 0)
