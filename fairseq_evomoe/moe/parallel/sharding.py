"""Keeping only this worker's experts of a layer built with all E of them."""

import torch

from ..experts import EXPERT_PARAM_NAMES
from .placement import ExpertPlacement


def shard_experts(experts, placement: ExpertPlacement):
    """Keep only this worker's experts of an ExpertFFNs built with all E experts (so that the
    initial weights, and the random stream after them, equal a single-process build) and tag their
    parameters: `p.expert` (fairseq's legacy_ddp leaves such parameters out of its all-reduce; they
    differ per worker) and `p.expert_parallel` (the placement, which the gradient norm and the
    optimizer state use). A no-op in one process."""
    if not placement.is_distributed:
        return experts
    assert experts.num_experts == placement.num_experts, (experts.num_experts, placement.num_experts)
    with torch.no_grad():
        for n in EXPERT_PARAM_NAMES:
            old = getattr(experts, n)
            new = torch.nn.Parameter(placement.local_part(old.detach()).clone(), requires_grad=old.requires_grad)
            for attr, value in vars(old).items():  # keep any tags
                setattr(new, attr, value)
            new.expert = True
            new.expert_parallel = placement
            setattr(experts, n, new)
    experts.num_experts = placement.num_local_experts
    return experts


def reset_experts(experts, placement: ExpertPlacement, std: float) -> None:
    """ExpertFFNs.reset_parameters(std=...) for this worker's experts, drawing the full [E, ...]
    tensors (the same random stream as one process) and keeping the local slice."""
    if not placement.is_distributed:
        experts.reset_parameters(std=std)
        return
    with torch.no_grad():
        for wn, bn in (("fc1_weight", "fc1_bias"), ("fc2_weight", "fc2_bias")):
            w = getattr(experts, wn)
            full = w.new_empty((placement.num_experts,) + tuple(w.shape[1:])).normal_(0.0, std)
            w.copy_(placement.local_part(full))
            getattr(experts, bn).zero_()
