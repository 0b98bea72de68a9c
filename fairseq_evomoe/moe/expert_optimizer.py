"""The optimizer's side of expert parallelism: the gradient norm and the optimizer state.

Under expert parallelism (W > 1 workers) each worker holds a slice of every MoE layer's experts,
tagged `p.expert` (fairseq's data-parallel all-reduce skips such parameters) and `p.expert_parallel`
(the layer's ExpertParallel placement). Two things fairseq 0.12 does not do for them:

1. Gradient norm. fairseq's `utils.clip_grad_norm_` leaves `p.expert` parameters out of the norm
   (and then scales them by the clip coefficient). We count every expert exactly once: each worker
   adds the squared norms of its expert gradients divided by `p.expert_grad_copies` (how many
   workers hold an identical copy of that gradient: the replicas of an expert, or all W workers for
   EvoMoE's shared base expert), the sum is all-reduced, and

       norm = sqrt(dense_norm^2 + sum over workers of the expert terms),

   which is the norm one process computes over the same model. fairseq 0.12 has no hook for this
   (its `aggregate_norm_fn` is wired for FSDP only), so `install()` wraps `fairseq.utils.clip_grad_norm_`
   once per process, when expert parallelism is first set up; the wrapper hands everything to
   fairseq's own function and only adds the expert term when such parameters have gradients. One
   process never installs it. Not covered: `--fp16`/`--bf16` keep fp32 copies of the parameters
   without our tag, so there the norm stays fairseq's (experts left out).

2. Optimizer state in checkpoints. fairseq writes `optimizer.state_dict()` from rank 0 only, which
   for expert parameters would be rank 0's slice. fairseq 0.12 calls `consolidate_state_dict()` on
   the torch optimizer on every rank before each save, when the optimizer has it (the protocol of
   sharded optimizers). We give the optimizer that method: it gathers the expert state tensors
   (Adam's moments) of all workers to rank 0, and a `state_dict` post-hook puts the full
   `[E, ...]` tensors into what rank 0 saves, so the checkpoint holds single-process optimizer
   state, like the model weights (moe/expert_checkpoint.py). On load, every worker gets the full
   tensors (fairseq loads on rank 0 and broadcasts) and keeps its own slice before its next step.
   The methods are attached by a torch optimizer step pre-hook (`torch.optim.optimizer.
   register_optimizer_step_pre_hook`, registered by `install()`), the first time an optimizer
   holding expert-parallel parameters steps: fairseq builds its optimizer with no hook we could use.
"""

import types
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .expert_checkpoint import gather_to_rank0


def install() -> None:
    """Wrap fairseq's gradient clipping and hook torch's optimizer steps (once per process)."""
    from fairseq import utils

    if getattr(utils.clip_grad_norm_, "counts_experts", False):
        return
    utils.clip_grad_norm_ = _counting_experts(utils.clip_grad_norm_)
    register_optimizer_step_pre_hook(_before_step)


# -- 1. gradient norm ------------------------------------------------------------------------


def expert_grad_sq_norm(params) -> Optional[torch.Tensor]:
    """Sum over all workers of the squared expert-gradient norms, each expert counted once (a
    collective). None when no expert-parallel parameter has a gradient."""
    experts = [p for p in params if p.grad is not None and getattr(p, "expert_grad_copies", None)]
    if not experts:
        return None
    sq = torch.zeros((), dtype=torch.float32, device=experts[0].grad.device)
    for p in experts:
        sq += p.grad.detach().float().pow(2).sum() / p.expert_grad_copies
    dist.all_reduce(sq)
    return sq


def _counting_experts(fairseq_clip_grad_norm_):
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


# -- 2. optimizer state ----------------------------------------------------------------------


def _expert_params(optimizer) -> List[Tuple[int, torch.nn.Parameter]]:
    """(index in the optimizer's state_dict, parameter) of the expert-parallel parameters."""
    out, i = [], 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            par = getattr(p, "expert_parallel", None)
            if par is not None and par.is_distributed:
                out.append((i, p))
            i += 1
    return out


def _before_step(optimizer, args, kwargs) -> None:
    experts = getattr(optimizer, "_evomoe_expert_params", None)
    if experts is None:  # first step of this optimizer
        experts = _expert_params(optimizer)
        optimizer._evomoe_expert_params = experts
        if experts:
            optimizer._evomoe_full_state = None
            optimizer.consolidate_state_dict = types.MethodType(consolidate_state_dict, optimizer)
            optimizer.register_state_dict_post_hook(_save_full_state)
    for _, p in experts:
        keep_local_slice(optimizer, p)


def _is_per_expert(value, p) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == p.dim() and value.shape[1:] == p.shape[1:]


def keep_local_slices(optimizer, params) -> None:
    """keep_local_slice for each of `params` that expert parallelism spreads over workers (the
    others hold every expert anyway): state just loaded from a checkpoint holds all E experts
    until the next step, and the EvoMoE spawn and the base expert's step need this worker's now."""
    for p in params:
        par = getattr(p, "expert_parallel", None)
        if par is not None and par.is_distributed:
            keep_local_slice(optimizer, p)


def keep_local_slice(optimizer, p) -> None:
    """State loaded from a checkpoint holds all E experts: keep this worker's (before the EvoMoE
    spawn, global expert 0's in every slot, as for the weights: expert_checkpoint)."""
    par = p.expert_parallel
    state = optimizer.state.get(p)
    if not state:
        return
    for key, value in list(state.items()):
        if not _is_per_expert(value, p) or value.shape[0] == p.shape[0]:
            continue
        if value.shape[0] != par.num_experts:
            raise RuntimeError(
                f"optimizer state {key!r} of an expert parameter has {value.shape[0]} experts, the model "
                f"{par.num_experts} (this worker holds {p.shape[0]}); check --moe-expert-count, or resume "
                "with --reset-optimizer"
            )
        state[key] = par.local_part(value).clone()


@torch.no_grad()
def consolidate_state_dict(optimizer) -> None:
    """Collective (fairseq calls it on every rank before a save): rank 0 keeps the full [E, ...]
    state tensors of every expert parameter for the next `state_dict()`."""
    experts = optimizer._evomoe_expert_params
    mine = [sorted(k for k, v in optimizer.state.get(p, {}).items() if _is_per_expert(v, p)) for _, p in experts]
    everyone: List = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(theirs != mine for theirs in everyone):
        raise RuntimeError("expert parallelism: the workers' optimizers hold different expert state; cannot save it")
    full: Dict[int, Dict[str, torch.Tensor]] = {}
    for (index, p), keys in zip(experts, mine):
        for key in keys:
            t = gather_to_rank0(optimizer.state[p][key], p.expert_parallel)
            if t is not None:
                full.setdefault(index, {})[key] = t
    optimizer._evomoe_full_state = (_versions(optimizer), full) if dist.get_rank() == 0 else None


def _versions(optimizer) -> tuple:
    return tuple(
        (index, key, v._version)
        for index, p in optimizer._evomoe_expert_params
        for key, v in sorted(optimizer.state.get(p, {}).items())
        if isinstance(v, torch.Tensor)
    )


def _save_full_state(optimizer, state_dict):
    if not any(optimizer.state.get(p) for _, p in optimizer._evomoe_expert_params):
        return state_dict  # nothing stepped yet
    snap = optimizer._evomoe_full_state
    if snap is None or snap[0] != _versions(optimizer):
        raise RuntimeError(
            "expert parallelism: the optimizer state of the experts is gathered on rank 0 by "
            "consolidate_state_dict() (fairseq calls it on every rank before saving a checkpoint); call it "
            "on every rank right before state_dict()"
        )
    for index, entries in snap[1].items():
        # a new dict: state_dict()["state"][i] is the optimizer's live per-parameter state
        state_dict["state"][index] = {**state_dict["state"][index], **entries}
    return state_dict
