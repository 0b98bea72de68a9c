"""The Hash layer gate (Roller et al. 2021, "Hash Layers For Large Sparse Models").

Each token goes to one fixed expert chosen by its token id alone: expert = table[id], weight 1.
There is no learned router and no balance loss; routing never changes during training.

`--hash-mode random` (default): a seeded universal hash (Carter & Wegman),
    h(id) = ((a * id + b) mod p) mod E,   p = 2^31 - 1,  a in [1, p), b in [0, p) drawn from `--moe-seed`.
`--hash-mode balanced`: a frequency-balanced table from the dictionary counts: tokens are taken
    from most to least frequent (ties in a seeded random order) and each goes to the expert with
    the smallest total count so far (ties: lowest expert index), so every expert receives about
    the same share of the corpus' token mass (the greedy longest-processing-time rule: the
    heaviest and lightest experts differ by at most one token's count).

The table [V] (V = dictionary size) is a buffer, so checkpoints carry it. Every MoE layer with
this gate uses the same table. Without a dictionary (a stand-alone layer), `random` computes
h(id) on the fly and `balanced` is refused.
"""

import heapq
from typing import Optional, Tuple
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from torch import Tensor

from .base import Gate, Routing, register_gate

HASH_MODES = ("random", "balanced")
PRIME = 2**31 - 1


def hash_coefficients(seed: int) -> Tuple[int, int]:
    """(a, b) of the universal hash, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(1, PRIME, (), generator=g)), int(torch.randint(0, PRIME, (), generator=g))


def universal_hash(ids: Tensor, num_experts: int, seed: int, coefficients: Optional[Tuple[int, int]] = None) -> Tensor:
    """((a * id + b) mod p) mod E with (a, b) drawn from `seed` (or given, as drawn before);
    int64 arithmetic never overflows."""
    a, b = coefficients or hash_coefficients(seed)
    return ((ids.long() % PRIME) * a + b) % PRIME % num_experts


def frequency_balanced_table(counts, num_experts: int, seed: int) -> Tensor:
    """Expert of each token id: the most frequent tokens first, each to the lightest expert."""
    counts = torch.as_tensor(list(counts), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(counts), generator=g)
    order = shuffled[torch.argsort(counts[shuffled], descending=True, stable=True)]
    table = torch.empty(len(counts), dtype=torch.long)
    heap = [(0.0, e) for e in range(num_experts)]  # (mass so far, expert)
    for tok in order.tolist():
        mass, e = heapq.heappop(heap)
        table[tok] = e
        heapq.heappush(heap, (mass + float(counts[tok]), e))
    return table


@dataclass
class HashOptions(FairseqDataclass):
    hash_mode: str = field(
        default="random",
        metadata={"help": "hash gate: token-to-expert table: random (seeded hash of the token id, --moe-seed) or "
                  "balanced (dictionary frequencies spread evenly over the experts)"},
    )


@register_gate("hash", options=HashOptions)
class HashGate(Gate):
    state_keys = (frozenset({"table"}),)

    def __init__(self, model_dim, num_experts, args, dictionary=None):
        super().__init__(model_dim, num_experts, args, dictionary)
        self.mode = getattr(args, "hash_mode", "random")
        self.seed = getattr(args, "moe_seed", 1)
        if self.mode not in HASH_MODES:
            raise ValueError(f"--hash-mode {self.mode!r} is not valid; choose one of: {', '.join(HASH_MODES)}")
        if dictionary is None:
            if self.mode == "balanced":
                raise ValueError("--hash-mode balanced needs the dictionary's counts; use --hash-mode random")
            table = torch.empty(0, dtype=torch.long)  # hash on the fly
        elif self.mode == "balanced":
            table = frequency_balanced_table(dictionary.count, num_experts, self.seed)
        else:
            table = universal_hash(torch.arange(len(dictionary)), num_experts, self.seed)
        self.register_buffer("table", table)
        self.coefficients = hash_coefficients(self.seed)  # drawn once, not at every forward

    def expert_of(self, token_ids: Tensor) -> Tensor:
        if self.table.numel() == 0:
            return universal_hash(token_ids, self.num_experts, self.seed, self.coefficients)
        return self.table[token_ids]

    def forward(self, x: Tensor, token_ids=None, valid=None) -> Routing:
        if token_ids is None:
            raise ValueError("--moe-gate hash routes by token id, but this MoE layer was given no token ids")
        expert = self.expert_of(token_ids.reshape(-1))
        weight = x.new_ones(x.shape[0], dtype=torch.float)
        zero = x.new_zeros((), dtype=torch.float)
        return Routing(
            token_idx=torch.arange(x.shape[0], device=x.device),
            expert_idx=expert,
            weight=weight,
            priority=weight,
            rank=None,
            probs=None,
            balance_loss=zero,
            z_loss=zero,
            valid=valid,
        )
