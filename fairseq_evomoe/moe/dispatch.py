"""Index-based dispatch: apply capacity to a routing and group its assignments by expert.

Everything here is O(P log P) on P assignments with no [tokens, experts, capacity] one-hot tensor,
and every shape is static (P), so the host never waits for the device: assignments are ordered by
(expert, choice rank, priority) with stable sorts, an expert keeps its first `capacity`
assignments, and a last stable sort moves the assignments that are not kept (dropped, or invalid:
padding) behind the kept ones. The experts run on the first sum(counts) rows of that order, as
contiguous groups, and the rest contribute nothing.
"""

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .gates.base import Routing, count_per_expert

DROP_POLICIES = ("score", "position")

Capacity = Union[int, Tensor]  # a LongTensor scalar where the number of tokens is on the device


def expert_capacity(num_tokens: Union[int, Tensor], num_experts: int, capacity_factor: float, k: int = 1) -> Optional[Capacity]:
    """Assignments each expert may take: ceil(factor * k * tokens / experts); None = dropless.

    capacity_factor > 0 gives a fixed capacity; 0 means no limit (nothing is ever dropped).
    The factor is taken as the decimal the user wrote (1.1 is 11/10, not the binary float just above
    it), so that 1.1 * 200 / 4 gives 55 and not 56. num_tokens may be a LongTensor scalar on the
    device (padding left in place): the same rational arithmetic then runs there, in integers.
    """
    if capacity_factor < 0:
        raise ValueError(f"capacity factor must be >= 0 (0 = dropless), got {capacity_factor}")
    if capacity_factor == 0:
        return None
    factor = Fraction(repr(float(capacity_factor)))
    if isinstance(num_tokens, Tensor):
        num, den = factor.numerator * k, factor.denominator * num_experts
        return ((num_tokens * num + den - 1) // den).clamp(min=1)
    return max(1, math.ceil(factor * k * num_tokens / num_experts))


@dataclass
class DispatchPlan:
    """The routing's assignments in dispatch order: kept ones first, grouped by expert.

    order: LongTensor [P], indices into the routing's assignments; its first sum(counts) entries
        are the kept assignments grouped by expert, the others follow (dropped or invalid).
    counts: LongTensor [E], assignments kept per expert.
    routed_counts: LongTensor [E], valid assignments per expert before capacity.
    max_rows: a bound on counts[e] known on the host (the capacity for the largest possible number
        of tokens; when dropless, the gate's max_per_expert), for the experts' batched path; None:
        none known.
    """

    order: Tensor
    counts: Tensor
    routed_counts: Tensor
    max_rows: Optional[int] = None

    @property
    def num_dropped(self) -> Tensor:
        return self.routed_counts.sum() - self.counts.sum()

    def kept_mask(self) -> Tensor:
        """bool [P]: whether order[i] is kept (i < sum(counts))."""
        return torch.arange(self.order.numel(), device=self.order.device) < self.counts.sum()

    def kept(self) -> Tensor:
        """The kept assignments (order[:sum(counts)]); reads their number on the host: for tests
        and references."""
        return self.order[: int(self.counts.sum())]


def plan_dispatch(routing: Routing, num_experts: int, capacity: Optional[Capacity], policy: str = "score",
                  max_rows: Optional[int] = None) -> DispatchPlan:
    """Order assignments by expert and drop what exceeds `capacity` (None = keep all).

    Within an expert, earlier choice ranks come first; then higher priority (policy `score`,
    batch-prioritized routing) or lower token index (policy `position`, arrival order).
    capacity: an int, or a LongTensor scalar on the device; max_rows: a host bound on it (see
    DispatchPlan).
    """
    valid = routing.valid
    # invalid assignments form a group after the last expert
    group = routing.expert_idx if valid is None else routing.expert_idx.masked_fill(~valid, num_experts)
    routed_counts = count_per_expert(routing.expert_idx, num_experts, valid)
    if capacity is None or not routing.droppable:
        return DispatchPlan(torch.argsort(group, stable=True), routed_counts, routed_counts, max_rows)

    if policy == "score":
        order = torch.argsort(routing.priority, descending=True, stable=True)
    elif policy == "position":
        order = torch.argsort(routing.token_idx, stable=True)
    else:
        raise ValueError(f"--moe-drop-policy {policy!r} is not valid; choose one of: {', '.join(DROP_POLICIES)}")
    if routing.rank is not None:
        order = order[torch.argsort(routing.rank[order], stable=True)]
    order = order[torch.argsort(group[order], stable=True)]

    starts = torch.cumsum(routed_counts, 0) - routed_counts
    position = torch.arange(order.numel(), device=order.device) - starts[group[order].clamp(max=num_experts - 1)]
    # dropped and invalid assignments move behind the kept ones, which keep their order
    keep = (position < capacity) & (group[order] < num_experts)
    order = order[torch.argsort((~keep).to(torch.uint8), stable=True)]
    # clamp takes a host int (no copy to the device) or a device tensor alike
    return DispatchPlan(order, routed_counts.clamp(max=capacity), routed_counts, max_rows)
