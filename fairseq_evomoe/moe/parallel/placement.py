"""Which experts each worker holds under expert parallelism: arithmetic over (E, W, rank).

P = min(E, W) workers form an expert-parallel *block* holding all E experts, E/P per worker
(global experts [p*E/P, (p+1)*E/P) on block position p = rank % P). With W = E/k that is E/W
experts per worker; with W a multiple of E every worker holds one expert and the W/E blocks are
*replicas* of each other (rank r holds expert r % E). Anything else is a ValueError at model build
that names --moe-expert-count and the world size.

Process groups: the token exchange uses the default (world) group, so no group is created for it.
A replica group is needed only when experts are replicated and P > 1; then each MoE layer calls
`torch.distributed.new_group` P times at build (every rank, same order), which is what torch asks
of subgroup creation.
"""

from typing import Optional

import torch.distributed as dist
from torch import Tensor


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


class ExpertPlacement:
    def __init__(self, num_experts: int, world_size: int = 1, rank: int = 0, group=None, replica_group=None):
        if world_size > 1:
            check_expert_placement(num_experts, world_size)
        self.num_experts = num_experts
        self.world_size = world_size
        self.rank = rank
        self.group = group  # token exchange group (None = the default world group)
        self.replica_group = replica_group  # None = the world (used only when replicas > 1)

    @classmethod
    def single_process(cls, num_experts: int) -> "ExpertPlacement":
        return cls(num_experts)

    @classmethod
    def from_environment(cls, num_experts: int) -> "ExpertPlacement":
        """The expert placement for this process: every expert local unless torch.distributed runs
        with more than one worker. Raises ValueError when E and W do not divide one another."""
        world = distributed_world()
        if world is None or world[0] == 1:
            return cls.single_process(num_experts)
        world_size, rank = world
        check_expert_placement(num_experts, world_size)
        placement = cls(num_experts, world_size, rank)
        if placement.num_replicas > 1 and placement.block_size > 1:
            # replica group of block position j: ranks {j, P + j, 2P + j, ...}; every rank creates all
            for j in range(placement.block_size):
                g = dist.new_group(list(range(j, world_size, placement.block_size)))
                if j == placement.block_position:
                    placement.replica_group = g
        return placement

    def __deepcopy__(self, memo):  # process groups are shared resources: copies share the placement
        return self

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

    def local_part(self, full: Tensor) -> Tensor:
        """This worker's rows of a tensor over all E experts (weights or optimizer state from a
        checkpoint; a view: copy it to keep it)."""
        lo = self.first_local_expert
        return full[lo : lo + self.num_local_experts]
