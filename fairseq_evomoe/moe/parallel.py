"""Where the experts of a layer run: all locally (one process) or spread over workers.

`run_experts(experts, x, counts)` takes tokens grouped by *global* expert (counts[e] rows for
expert e) and returns the expert outputs in the same order.

One process (torch.distributed not initialized, or world size 1): a grouped matmul over every
expert, exactly as before.

Expert parallelism (torch.distributed initialized, world size W > 1, E experts per layer):

- placement: P = min(E, W) workers form an expert-parallel *block* holding all E experts, E/P per
  worker (global experts [p*E/P, (p+1)*E/P) on block position p = rank % P). With W = E/k that is
  E/W experts per worker; with W a multiple of E every worker holds one expert and the W/E blocks
  are *replicas* of each other (rank r holds expert r % E). Anything else is a ValueError at model
  build that names --moe-expert-count and the world size.
- exchange: a worker sends each token to the worker of its block that holds the token's expert,
  with `all_to_all_single` over the world group and uneven splits (peers outside the block get 0
  rows). Per-(destination, local expert) counts are exchanged first (one small all_to_all), then the
  tokens, then the outputs go back the same way. Every MoE layer makes exactly these three calls per
  forward on every worker, whatever the counts (0 tokens for an expert, or for a whole worker,
  still makes the calls with empty tensors), so workers never disagree on the collective sequence.
  The two token exchanges are an autograd Function whose backward is the reverse exchange.
- gradients: expert weights enter the computation through `_ExpertGrad`, an identity whose backward
  multiplies the weight gradient by 1/W and, when experts are replicated, sums it over the replica
  group. Why 1/W: fairseq averages dense gradients over the W workers (DDP) and then multiplies all
  gradients by W / sample_size; an expert gradient already sums the contributions of every worker's
  tokens (they came to it through the all_to_all), so 1/W makes it exactly the single-process
  gradient. The expert parameters are left out of DDP's all-reduce (see
  `fairseq_evomoe.moe.expert_checkpoint.ExpertParallelModelMixin`).

Process groups: the token exchange uses the default (world) group, so no group is created for it.
A replica group is needed only when experts are replicated and P > 1; then each MoE layer calls
`torch.distributed.new_group` P times at build (every rank, same order), which is what torch asks
of subgroup creation.
"""

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

EXPERT_PARAM_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def distributed_world() -> Optional[tuple]:
    """(world_size, rank) when torch.distributed is initialized, else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return None


def check_expert_placement(num_experts: int, world_size: int) -> None:
    if num_experts % world_size != 0 and world_size % num_experts != 0:
        raise ValueError(
            f"--moe-expert-count {num_experts} cannot be spread over a distributed world size of {world_size}: "
            f"expert parallelism needs the expert count to be a multiple of the world size (each worker holds "
            f"expert-count / world-size experts) or the world size to be a multiple of the expert count (experts "
            f"are replicated); e.g. use --moe-expert-count {world_size * max(1, round(num_experts / world_size))} "
            f"or a world size that divides or is divided by {num_experts}"
        )


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of the rows of x with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _all_to_all(x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all(x: Tensor, out_splits: List[int], in_splits: List[int], group=None) -> Tensor:
    """Differentiable all_to_all_single over the first dimension (uneven splits allowed)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class _ExpertGrad(torch.autograd.Function):
    """Identity on an expert weight; backward scales its gradient and sums it over replicas."""

    @staticmethod
    def forward(ctx, p: Tensor, scale: float, replica_group, reduce: bool):
        ctx.scale, ctx.replica_group, ctx.reduce = scale, replica_group, reduce
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad * ctx.scale
        if ctx.reduce:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.replica_group)
        return grad, None, None, None


def _set_grad_copies(experts, copies: int) -> None:
    """How many workers hold an identical copy of these expert gradients (for the gradient norm)."""
    for n in EXPERT_PARAM_NAMES:
        getattr(experts, n).expert_grad_copies = copies


class ExpertParallel:
    def __init__(
        self,
        num_experts: int,
        world_size: int = 1,
        rank: int = 0,
        group=None,
        replica_group=None,
    ):
        if world_size > 1:
            check_expert_placement(num_experts, world_size)
        self.num_experts = num_experts
        self.world_size = world_size
        self.rank = rank
        self.group = group  # token exchange group (None = the default world group)
        self.replica_group = replica_group  # None = the world (used only when replicas > 1)
        # set by the last checkpoint load: the layer was not spawned yet, so every local slot takes
        # global expert 0's weights and optimizer state (expert_checkpoint, expert_optimizer)
        self.loaded_before_spawn = False

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def single_process(cls, num_experts: int) -> "ExpertParallel":
        return cls(num_experts)

    @classmethod
    def from_environment(cls, num_experts: int) -> "ExpertParallel":
        """The expert placement for this process: every expert local unless torch.distributed runs
        with more than one worker. Raises ValueError when E and W do not divide one another."""
        world = distributed_world()
        if world is None or world[0] == 1:
            return cls.single_process(num_experts)
        world_size, rank = world
        check_expert_placement(num_experts, world_size)
        par = cls(num_experts, world_size, rank)
        if par.num_replicas > 1 and par.block_size > 1:
            # replica group of block position j: ranks {j, P + j, 2P + j, ...}; every rank creates all
            for j in range(par.block_size):
                g = dist.new_group(list(range(j, world_size, par.block_size)))
                if j == par.block_position:
                    par.replica_group = g
        return par

    def __deepcopy__(self, memo):  # process groups are shared resources: copies share the placement
        return self

    # -- placement ---------------------------------------------------------------------------

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def block_size(self) -> int:
        """P: workers that together hold all experts once."""
        return min(self.num_experts, self.world_size)

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.block_size

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.block_size

    @property
    def block_position(self) -> int:
        return self.rank % self.block_size

    @property
    def first_local_expert(self) -> int:
        return self.block_position * self.num_local_experts

    @property
    def local_experts(self) -> range:
        return range(self.first_local_expert, self.first_local_expert + self.num_local_experts)

    def owner(self, expert: int, rank: Optional[int] = None) -> int:
        """The rank in `rank`'s block (default: this worker's) that holds global `expert`."""
        rank = self.rank if rank is None else rank
        return (rank // self.block_size) * self.block_size + expert // self.num_local_experts

    # -- compute -----------------------------------------------------------------------------

    def local_part(self, full: Tensor) -> Tensor:
        """This worker's rows of a tensor over all E experts (weights or optimizer state from a
        checkpoint): its own experts', or, when the checkpoint predates the EvoMoE spawn, global
        expert 0's in every slot (a view; copy it to keep it)."""
        if self.loaded_before_spawn:
            return full[0:1].expand(self.num_local_experts, *full.shape[1:])
        lo = self.first_local_expert
        return full[lo : lo + self.num_local_experts]

    def run_experts(self, experts, x: Tensor, counts: Tensor) -> Tensor:
        if not self.is_distributed:
            return experts(x, counts)
        return self._run_distributed(experts, x, counts)

    def _run_distributed(self, experts, x: Tensor, counts: Tensor) -> Tensor:
        W, L, P = self.world_size, self.num_local_experts, self.block_size
        assert experts.num_experts == L, (experts.num_experts, L)
        # send_counts[d, l]: rows for local expert l of rank d (0 outside this worker's block)
        send_counts = counts.new_zeros(W, L)
        start = (self.rank // P) * P
        send_counts[start : start + P] = counts.reshape(P, L)
        recv_counts = _all_to_all(send_counts.reshape(-1), [L] * W, [L] * W, self.group).reshape(W, L)
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()

        recv = all_to_all(x, out_splits, in_splits, self.group)  # grouped by (source, local expert)
        local_ids = torch.arange(L, device=x.device).repeat(W).repeat_interleave(recv_counts.reshape(-1).to(x.device))
        order = torch.argsort(local_ids, stable=True)  # -> grouped by local expert
        y_sorted = self.local_forward(experts, recv[order], recv_counts.sum(0).tolist())
        y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to (source, local expert)
        return all_to_all(y, in_splits, out_splits, self.group)

    def local_forward(self, experts, x: Tensor, counts: Sequence[int]) -> Tensor:
        """The local experts on their groups of x, on the same compute path as in one process. All
        their parameters enter the autograd graph even when a group (or x) has no rows, so the graph,
        and with it the order of collectives in backward, is the same on all ranks."""
        reduce = self.num_replicas > 1
        scale = 1.0 / self.world_size
        _set_grad_copies(experts, self.num_replicas)
        params = [_ExpertGrad.apply(getattr(experts, n), scale, self.replica_group, reduce) for n in EXPERT_PARAM_NAMES]
        return experts(x, list(counts), params=params)

    # -- expert-diversify: one base expert, held by every worker ------------------------------

    def share_base_expert(self, experts) -> None:
        """Make every local expert slot a copy of global expert 0, the base expert (in expert
        parallelism rank 0 holds it in its slot 0 and broadcasts it)."""
        with torch.no_grad():
            for n in EXPERT_PARAM_NAMES:
                p = getattr(experts, n)
                base = p[0].clone()
                if self.is_distributed:
                    dist.broadcast(base, src=0)
                p.copy_(base.unsqueeze(0).expand_as(p))

    def run_base_expert(self, experts, x: Tensor) -> Tensor:
        """The base expert (slot 0) as a dense FFN on this worker's tokens. With several workers each
        holds a copy, kept identical by averaging its gradients over all workers, as data-parallel
        training does for dense weights (scale 1/W, summed over the world)."""
        params = None
        if self.is_distributed:
            _set_grad_copies(experts, self.world_size)  # every worker holds the same base-expert gradient
            params = [_ExpertGrad.apply(getattr(experts, n), 1.0 / self.world_size, None, True) for n in EXPERT_PARAM_NAMES]
        if x.device.type != "cpu":  # (the group sizes of a list would be copied to the GPU, a host wait)
            return experts.forward_one(x, 0, params=params)
        # on the CPU, every token in expert 0's group of the experts' own path: its weight gradients
        # reuse their memory and the other experts' zero slots are not rewritten every step
        return experts(x, [x.shape[0]] + [0] * (experts.num_experts - 1), params=params)

    # -- sharding of a fully built layer -----------------------------------------------------

    def localize(self, experts):
        """Keep only this worker's experts of an ExpertFFNs built with all E experts (so that the
        initial weights, and the random stream after them, equal a single-process build), and
        install the hooks that save all E experts and load the local ones (expert_checkpoint)."""
        from . import expert_optimizer
        from .expert_checkpoint import install_expert_hooks

        if self.is_distributed:
            assert experts.num_experts == self.num_experts, (experts.num_experts, self.num_experts)
            lo, hi = self.first_local_expert, self.first_local_expert + self.num_local_experts
            with torch.no_grad():
                for n in EXPERT_PARAM_NAMES:
                    old = getattr(experts, n)
                    new = torch.nn.Parameter(old.detach()[lo:hi].clone(), requires_grad=old.requires_grad)
                    for attr, value in vars(old).items():  # keep any tags
                        setattr(new, attr, value)
                    # fairseq's legacy_ddp skips `p.expert` parameters in its all-reduce (they differ per
                    # worker); the gradient norm and the optimizer state use the placement
                    # (moe/expert_optimizer.py)
                    new.expert = True
                    new.expert_parallel = self
                    setattr(experts, n, new)
            experts.num_experts = self.num_local_experts
            expert_optimizer.install()
        install_expert_hooks(experts, self)
        return experts

    def reset_experts(self, experts, std: float) -> None:
        """ExpertFFNs.reset_parameters(std=...) for this worker's experts, drawing the full [E, ...]
        tensors (the same random stream as one process) and keeping the local slice."""
        if not self.is_distributed:
            experts.reset_parameters(std=std)
            return
        lo, hi = self.first_local_expert, self.first_local_expert + self.num_local_experts
        with torch.no_grad():
            for wn, bn in (("fc1_weight", "fc1_bias"), ("fc2_weight", "fc2_bias")):
                w = getattr(experts, wn)
                full = w.new_empty((self.num_experts,) + tuple(w.shape[1:])).normal_(0.0, std)
                w.copy_(full[lo:hi])
                getattr(experts, bn).zero_()
