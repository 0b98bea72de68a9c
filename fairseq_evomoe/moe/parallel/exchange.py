"""Running the experts of a layer over the workers that hold them.

`run_experts(placement, experts, x, counts)` takes tokens grouped by *global* expert (counts[e]
rows for expert e, then rows of no expert: assignments not kept) and returns the expert outputs in
the same order (0 for the rows of no expert). In one process it is the experts' own grouped
computation.

Host reads: under expert parallelism the layer reads on the host once per forward, after the
count exchange: the split sizes of the token all-to-all (sent and received) and the local experts'
group sizes, in one copy. all_to_all_single needs its split sizes on the host; everything else in
the layer step stays on the device (moe/layer.py). In one process there is no such read.

Exchange: a worker sends each token to the worker of its block that holds the token's expert, with
`all_to_all_single` over the world group and uneven splits (peers outside the block get 0 rows).
Per-(destination, local expert) counts are exchanged first (one small all_to_all), then the tokens,
then the outputs go back the same way. Every MoE layer makes exactly these three calls per forward
on every worker, whatever the counts (0 tokens for an expert, or for a whole worker, still makes
the calls with empty tensors), so workers never disagree on the collective sequence. The two token
exchanges are differentiable: their backward is the reverse exchange.

Gradients: expert weights enter the computation through `_ExpertGrad`, an identity whose backward
multiplies the weight gradient by 1/W and, when experts are replicated, sums it over the replica
group. Why 1/W: fairseq averages dense gradients over the W workers (DDP) and then multiplies all
gradients by W / sample_size; an expert gradient already sums the contributions of every worker's
tokens (they came to it through the all_to_all), so 1/W makes it exactly the single-process
gradient. The expert parameters are left out of DDP's all-reduce (parallel/checkpoint.py,
`ExpertParallelModelMixin`).
"""

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..experts import EXPERT_PARAM_NAMES
from .collectives import all_to_all, all_to_all_rows
from .placement import ExpertPlacement


class _ExpertGrad(torch.autograd.Function):
    """Identity on an expert weight; backward scales its gradient and sums it over a group."""

    @staticmethod
    def forward(ctx, p: Tensor, scale: float, group, reduce: bool):
        ctx.scale, ctx.group, ctx.reduce = scale, group, reduce
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad * ctx.scale
        if ctx.reduce:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None, None


def _wrapped_params(experts, placement: ExpertPlacement, group, reduce: bool, copies: int) -> List[Tensor]:
    """The experts' parameters behind _ExpertGrad (scale 1/W; summed over `group` when `reduce`),
    tagged with how many workers hold an identical copy of their gradient (for the gradient norm,
    parallel/grad_norm.py)."""
    for n in EXPERT_PARAM_NAMES:
        getattr(experts, n).expert_grad_copies = copies
    scale = 1.0 / placement.world_size
    return [_ExpertGrad.apply(getattr(experts, n), scale, group, reduce) for n in EXPERT_PARAM_NAMES]


def data_parallel_params(experts, placement: ExpertPlacement) -> Optional[List[Tensor]]:
    """The experts' parameters for a computation that every worker runs on its own tokens with the
    same weights (as for dense weights): their gradients are averaged over all workers. None in
    one process (use the parameters themselves)."""
    if not placement.is_distributed:
        return None
    return _wrapped_params(experts, placement, None, True, placement.world_size)


def run_experts(placement: ExpertPlacement, experts, x: Tensor, counts: Tensor, max_rows: Optional[int] = None) -> Tensor:
    """x: [P, M] grouped by global expert, then rows of no expert (output 0); max_rows: a host
    bound on every count (None: none), for the experts' batched path."""
    if not placement.is_distributed:
        return experts(x, counts, max_rows=max_rows)
    y = exchange_and_run(placement, experts, x, counts)  # the grouped rows come first
    return F.pad(y, (0, 0, 0, x.shape[0] - y.shape[0]))


def exchange_and_run(placement: ExpertPlacement, experts, x: Tensor, counts: Tensor) -> Tensor:
    W, L, P = placement.world_size, placement.num_local_experts, placement.block_size
    assert experts.num_experts == L, (experts.num_experts, L)
    # send_counts[d, l]: rows for local expert l of rank d (0 outside this worker's block)
    send_counts = counts.new_zeros(W, L)
    start = (placement.rank // P) * P
    send_counts[start : start + P] = counts.reshape(P, L)
    recv_counts = all_to_all_rows(send_counts.reshape(-1), [L] * W, [L] * W, placement.group).reshape(W, L)
    local_group_sizes = recv_counts.sum(0)  # [L], kept on the device for the experts
    # the layer's one host read: the split sizes, sent and received, and the local group sizes
    host = torch.cat([send_counts.sum(1), recv_counts.sum(1), local_group_sizes]).tolist()
    in_splits, out_splits, local_counts = host[:W], host[W : 2 * W], host[2 * W :]

    x = x[: sum(in_splits)]  # the grouped rows
    recv = all_to_all(x, out_splits, in_splits, placement.group)  # grouped by (source, local expert)
    # output_size and the device copy of the local counts: no further host read (repeat_interleave
    # would read its total, and a list of counts would be copied to the device)
    local_ids = torch.arange(L, device=x.device).repeat(W).repeat_interleave(
        recv_counts.reshape(-1).to(x.device), output_size=sum(out_splits))
    order = torch.argsort(local_ids, stable=True)  # -> grouped by local expert
    y_sorted = local_forward(placement, experts, recv[order], local_group_sizes.to(x.device), max(local_counts, default=0))
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to (source, local expert)
    return all_to_all(y, in_splits, out_splits, placement.group)


def local_forward(placement: ExpertPlacement, experts, x: Tensor, counts: Tensor, max_rows: int) -> Tensor:
    """The local experts on their groups of x (counts [L] on x's device; max_rows: the largest, read
    on the host already), on the same compute path as in one process. All their parameters enter
    the autograd graph even when a group (or x) has no rows, so the graph, and with it the order of
    collectives in backward, is the same on all ranks."""
    reduce = placement.num_replicas > 1
    params = _wrapped_params(experts, placement, placement.replica_group, reduce, placement.num_replicas)
    return experts(x, counts, params=params, max_rows=max(max_rows, 1))
