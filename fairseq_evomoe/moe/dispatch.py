"""Index-based dispatch: apply capacity to a routing and group its assignments by expert.

Everything here is O(P log P) on P assignments with no [tokens, experts, capacity] one-hot tensor:
assignments are ordered by (expert, choice rank, priority) with stable sorts, and an expert keeps
its first `capacity` assignments. Tokens are later gathered in that order, run through the
experts as contiguous groups, and added back with `index_add_`.
"""

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .gates.base import Routing, count_per_expert

DROP_POLICIES = ("score", "position")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1) -> Optional[int]:
    """Assignments each expert may take: ceil(factor * k * tokens / experts); None = dropless.

    capacity_factor > 0 gives a fixed capacity; 0 means no limit (nothing is ever dropped).
    The factor is taken as the decimal the user wrote (1.1 is 11/10, not the binary float just above
    it), so that 1.1 * 200 / 4 gives 55 and not 56.
    """
    if capacity_factor < 0:
        raise ValueError(f"capacity factor must be >= 0 (0 = dropless), got {capacity_factor}")
    if capacity_factor == 0:
        return None
    return max(1, math.ceil(Fraction(repr(float(capacity_factor))) * k * num_tokens / num_experts))


@dataclass
class DispatchPlan:
    """Kept assignments, grouped by expert.

    order: LongTensor [K], indices into the routing's assignments, grouped by expert.
    counts: LongTensor [E], assignments kept per expert (sums to K).
    routed_counts: LongTensor [E], assignments per expert before capacity.
    """

    order: Tensor
    counts: Tensor
    routed_counts: Tensor

    @property
    def num_dropped(self) -> Tensor:
        return self.routed_counts.sum() - self.counts.sum()


def plan_dispatch(routing: Routing, num_experts: int, capacity: Optional[int], policy: str = "score") -> DispatchPlan:
    """Order assignments by expert and drop what exceeds `capacity` (None = keep all).

    Within an expert, earlier choice ranks come first; then higher priority (policy `score`,
    batch-prioritized routing) or lower token index (policy `position`, arrival order).
    With a capacity, the number of kept assignments is read on the host (on a GPU the one wait for
    the device in a top-1 or top-2 layer); running the dropped ones and discarding their output
    would avoid the wait but was slower on an H100 when many are dropped (docs/benchmarks.md).
    """
    expert = routing.expert_idx
    routed_counts = count_per_expert(expert, num_experts)
    if capacity is None or not routing.droppable:
        order = torch.argsort(expert, stable=True)
        return DispatchPlan(order, routed_counts, routed_counts)

    if policy == "score":
        order = torch.argsort(routing.priority, descending=True, stable=True)
    elif policy == "position":
        order = torch.argsort(routing.token_idx, stable=True)
    else:
        raise ValueError(f"--moe-drop-policy {policy!r} is not valid; choose one of: {', '.join(DROP_POLICIES)}")
    if routing.rank is not None:
        order = order[torch.argsort(routing.rank[order], stable=True)]
    order = order[torch.argsort(expert[order], stable=True)]

    starts = torch.cumsum(routed_counts, 0) - routed_counts
    position = torch.arange(order.numel(), device=order.device) - starts[expert[order]]
    keep = position < capacity
    return DispatchPlan(order[keep], routed_counts.clamp(max=capacity), routed_counts)
