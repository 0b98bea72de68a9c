"""The gradient norm under expert parallelism, each expert counted exactly once.

Under expert parallelism (W > 1 workers) each worker holds a slice of every MoE layer's experts,
tagged `p.expert` (parallel/sharding.py). fairseq's `utils.clip_grad_norm_` leaves `p.expert`
parameters out of the norm (and then scales them by the clip coefficient). Here each worker adds
the squared norms of its expert gradients divided by `p.expert_grad_copies` (how many workers hold
an identical copy of that gradient: the replicas of an expert, or all W workers for experts every
worker runs alike, parallel/exchange.py), the sum is all-reduced, and

    norm = sqrt(dense_norm^2 + sum over workers of the expert terms),

which is the norm one process computes over the same model. fairseq 0.12 has no hook for this (its
`aggregate_norm_fn` is wired for FSDP only), so fairseq_evomoe/patches.py wraps
`fairseq.utils.clip_grad_norm_` with `counting_experts` once per process, when expert parallelism
is first set up; the wrapper hands everything to fairseq's own function and only adds the expert
term when such parameters have gradients. One process never installs it.

Under --bf16 and --fp16 --fp16-no-flatten-grads the norm is taken over fairseq's fp32 master copies,
which carry the same tags (moe/parallel/mixed_precision.py); plain --fp16 (one flat master copy per
worker) is refused under expert parallelism.
"""

from typing import Optional

import torch
import torch.distributed as dist


def grad_copies(p) -> Optional[int]:
    """How many workers hold an identical copy of p's gradient (None: p is no expert-parallel
    weight); for an fp32 master copy, its parameter's (mixed_precision.py), set by each forward."""
    return getattr(getattr(p, "master_of", p), "expert_grad_copies", None)


def expert_grad_sq_norm(params) -> Optional[torch.Tensor]:
    """Sum over all workers of the squared expert-gradient norms, each expert counted once (a
    collective). None when no expert-parallel parameter has a gradient."""
    experts = [(p, grad_copies(p)) for p in params if p.grad is not None and grad_copies(p)]
    if not experts:
        return None
    sq = torch.zeros((), dtype=torch.float32, device=experts[0][0].grad.device)
    for p, copies in experts:
        sq += p.grad.detach().float().pow(2).sum() / copies
    dist.all_reduce(sq)
    return sq


def counting_experts(fairseq_clip_grad_norm_):
    """fairseq's clip_grad_norm_ with the expert term added (installed by fairseq_evomoe/patches.py)."""

    def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None) -> torch.Tensor:
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        expert_sq = expert_grad_sq_norm(params)
        if expert_sq is None:
            return fairseq_clip_grad_norm_(params, max_norm, aggregate_norm_fn)
        dense = fairseq_clip_grad_norm_(params, 0.0, aggregate_norm_fn)  # norm only, no clipping
        total = (dense.float().to(expert_sq.device) ** 2 + expert_sq).sqrt()
        if max_norm > 0:
            coef = (float(max_norm) / (total + 1e-6)).clamp_(max=1)
            torch._foreach_mul_([p.grad.detach() for p in params if p.grad is not None], coef)
        return total

    clip_grad_norm_.counts_experts = True
    return clip_grad_norm_
