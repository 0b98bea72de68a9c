"""Where the experts of a layer run: all locally (one process) or spread over workers.

`run_experts(experts, x, counts)` takes tokens grouped by *global* expert (counts[e] rows for
expert e) and returns the expert outputs in the same order. In one process it is a grouped
matmul over every expert.
"""

from typing import Optional

import torch
from torch import Tensor


class ExpertParallel:
    def __init__(self, num_experts: int, world_size: int = 1, rank: int = 0, group=None):
        self.num_experts = num_experts
        self.world_size = world_size
        self.rank = rank
        self.group = group

    @classmethod
    def single_process(cls, num_experts: int) -> "ExpertParallel":
        return cls(num_experts)

    @classmethod
    def from_environment(cls, num_experts: int) -> "ExpertParallel":
        """The expert placement for this process (every expert local in one process)."""
        return cls.single_process(num_experts)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def run_experts(self, experts, x: Tensor, counts: Tensor) -> Tensor:
        return experts(x, counts.tolist())
