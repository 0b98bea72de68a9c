"""The optimizer state of expert-parallel parameters in checkpoints.

fairseq writes `optimizer.state_dict()` from rank 0 only, which for expert parameters would be
rank 0's slice. fairseq 0.12 calls `consolidate_state_dict()` on the torch optimizer on every rank
before each save, when the optimizer has it (the protocol of sharded optimizers). We give the
optimizer that method: it gathers the expert state tensors (Adam's moments) of all workers to rank
0, and a `state_dict` post-hook puts the full `[E, ...]` tensors into what rank 0 saves, so the
checkpoint holds single-process optimizer state, like the model weights (parallel/checkpoint.py).
On load, every worker gets the full tensors (fairseq loads on rank 0 and broadcasts) and keeps its
own slice before its next step. The methods are attached by `before_step`, a torch optimizer step
pre-hook that fairseq_evomoe/patches.py registers, the first time an optimizer holding
expert-parallel parameters steps: fairseq builds its optimizer with no hook we could use.
"""

import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .collectives import gather_to_rank0


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


def before_step(optimizer, args, kwargs) -> None:
    """torch optimizer step pre-hook (registered by fairseq_evomoe/patches.py): on an optimizer's
    first step, give it the checkpoint methods if it holds expert-parallel parameters; before every
    step, slice state loaded from a checkpoint to this worker's experts."""
    experts = getattr(optimizer, "_expert_parallel_params", None)
    if experts is None:  # first step of this optimizer
        experts = _expert_params(optimizer)
        optimizer._expert_parallel_params = experts
        if experts:
            optimizer._expert_full_state = None
            optimizer.consolidate_state_dict = types.MethodType(consolidate_state_dict, optimizer)
            optimizer.register_state_dict_post_hook(_save_full_state)
    for _, p in experts:
        keep_local_slice(optimizer, p)


def _is_per_expert(value, p) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == p.dim() and value.shape[1:] == p.shape[1:]


def keep_local_slices(optimizer, params, rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
    """keep_local_slice for each of `params` that expert parallelism spreads over workers (the
    others hold every expert anyway): state just loaded from a checkpoint holds all E experts
    until the next step; for code that needs this worker's slice before then."""
    for p in params:
        par = getattr(p, "expert_parallel", None)
        if par is not None and par.is_distributed:
            keep_local_slice(optimizer, p, rows)


def keep_local_slice(optimizer, p, rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
    """State loaded from a checkpoint holds all E experts: keep this worker's rows of it, by
    default its own experts' (`rows` maps the full [E, ...] tensor to this worker's [E/P, ...])."""
    par = p.expert_parallel
    rows = rows or par.local_part
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
        state[key] = rows(value).clone()


@torch.no_grad()
def consolidate_state_dict(optimizer) -> None:
    """Collective (fairseq calls it on every rank before a save): rank 0 keeps the full [E, ...]
    state tensors of every expert parameter for the next `state_dict()`."""
    experts = optimizer._expert_parallel_params
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
    optimizer._expert_full_state = (_versions(optimizer), full) if dist.get_rank() == 0 else None


def _versions(optimizer) -> tuple:
    return tuple(
        (index, key, v._version)
        for index, p in optimizer._expert_parallel_params
        for key, v in sorted(optimizer.state.get(p, {}).items())
        if isinstance(v, torch.Tensor)
    )


def _save_full_state(optimizer, state_dict):
    if not any(optimizer.state.get(p) for _, p in optimizer._expert_parallel_params):
        return state_dict  # nothing stepped yet
    snap = optimizer._expert_full_state
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
