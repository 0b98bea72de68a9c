"""The collectives expert parallelism is built from: a differentiable all_to_all with uneven
splits, and a gather of every worker's expert slice to rank 0."""

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .placement import ExpertPlacement


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of the rows of x with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return all_to_all_rows(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_to_all_rows(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all_rows(x: Tensor, out_splits: List[int], in_splits: List[int], group=None) -> Tensor:
    """all_to_all_single over the first dimension (uneven splits allowed), not differentiable."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all(x: Tensor, out_splits: List[int], in_splits: List[int], group=None) -> Tensor:
    """Differentiable all_to_all_single over the first dimension (uneven splits allowed)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def gather_to_rank0(local: Tensor, placement: ExpertPlacement) -> Optional[Tensor]:
    """Collective: the [E, ...] tensor of all experts from every worker's [E/P, ...] slice, as a CPU
    tensor on rank 0 (None elsewhere); replicas (W > E) send theirs too, rank 0 keeps block 0's."""
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(placement.world_size)] if placement.rank == 0 else None
    dist.gather(local, parts, dst=0)
    return torch.cat(parts[: placement.block_size], dim=0).cpu() if placement.rank == 0 else None
