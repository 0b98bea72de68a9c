"""The BASE layer gate (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models").

Per token x, the affinity to expert e is a_e = W_g x (fp32, the LinearRouter's logits).

training: a *balanced* top-1 assignment that maximises the total affinity of the S local tokens
    subject to every expert taking the same number of tokens:
        max_z  sum_{t,e} z_{t,e} a_{t,e}   s.t.  sum_e z_{t,e} = 1,  sum_t z_{t,e} = S / E.
    With S = qE + r (r > 0), the first qE tokens are assigned with q per expert and the last r
    tokens with at most one each, so every expert gets q or q+1 tokens.
evaluation / generation: greedy top-1, e = argmax_e a_e (no balancing).
combine weight: sigmoid(a_e) of the chosen expert, as in the paper (the router learns from it).
balance loss: none (balanced by construction); z-loss: none.

Solvers (`--base-solver`):
    auction: Bertsekas' auction algorithm in torch (any device, deterministic, handles ties and
        any S); tokens bid for experts whose price rises as they fill, so the result is
        within S * eps of the optimum, eps = 1e-3 * (max a - min a).
    libbase: fairseq's C++ auction (`fairseq.libbase.balanced_assignment`, the BASE layer's own).
        It needs S divisible by E and can return an invalid assignment on exact ties, so its
        result is checked and the torch auction is used where it fails.

Works on the tokens of one process, so it runs unchanged under expert parallelism.

Host reads: the BASE gate is exempt from the MoE layer's rule of no host synchronisation within a
step (moe/layer.py). The auction reads its convergence (and eps) on the host every round, libbase
runs on the CPU, and where padding stays in place (off the CPU) the real tokens are gathered with
`nonzero` first, so that the balance is over them alone.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import FairseqDataclass
from torch import Tensor

from .base import Routing, register_gate
from .top_k import RouterGate

try:
    from fairseq import libbase
except ImportError:  # the C++ extension is optional in fairseq builds
    libbase = None

SOLVERS = ("auction", "libbase")


def auction_assignment(scores: Tensor, capacity: Tensor, eps: Optional[float] = None, max_rounds: int = 100000) -> Tensor:
    """Assign each of S tokens to one of E experts, expert e taking at most capacity[e] tokens,
    maximising the total score (within S * eps). scores: [S, E] fp32; sum(capacity) >= S.
    Returns the expert of each token, LongTensor [S]."""
    S, E = scores.shape
    owner = torch.full((S,), -1, dtype=torch.long, device=scores.device)
    if S == 0 or E == 1:
        return owner.clamp_(min=0)
    if eps is None:
        eps = max(float(scores.max() - scores.min()), 1e-6) * 1e-3
    price = scores.new_zeros(E)
    held = scores.new_full((S,), float("-inf"))  # the bid each assigned token holds
    for _ in range(max_rounds):
        free = (owner < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            break
        value = scores[free] - price  # what each free token gains from each expert
        top = value.topk(2, dim=1)
        best = top.indices[:, 0]
        bid = price[best] + (top.values[:, 0] - top.values[:, 1]) + eps
        # each expert keeps its `capacity` highest bids among its holders and the new bidders
        owner[free], held[free] = best, bid
        cand = (owner >= 0).nonzero().squeeze(1)
        order = cand[torch.argsort(held[cand], descending=True, stable=True)]
        order = order[torch.argsort(owner[order], stable=True)]
        expert = owner[order]
        counts = torch.bincount(expert, minlength=E)
        rank = torch.arange(order.numel(), device=scores.device) - (torch.cumsum(counts, 0) - counts)[expert]
        out = order[rank >= capacity[expert]]
        owner[out], held[out] = -1, float("-inf")
        # a full expert costs the lowest bid it holds; one with room costs 0
        last = rank == capacity[expert] - 1
        price = torch.zeros_like(price).index_put_((expert[last],), held[order[last]])
    else:
        raise RuntimeError("balanced assignment did not converge")
    return owner


def libbase_assignment(scores: Tensor) -> Optional[Tensor]:
    """fairseq's C++ solver for S divisible by E; None when unavailable or its answer is invalid."""
    S, E = scores.shape
    if libbase is None or E < 2 or S % E != 0:
        return None
    by_expert = libbase.balanced_assignment(scores.detach().float().cpu().contiguous()).to(scores.device)
    if by_expert.numel() != S or not torch.equal(torch.bincount(by_expert, minlength=S), torch.ones_like(by_expert)):
        return None
    owner = torch.empty(S, dtype=torch.long, device=scores.device)
    owner[by_expert] = torch.arange(E, device=scores.device).repeat_interleave(S // E)
    return owner


def balanced_assignment(scores: Tensor, solver: str = "auction") -> Tensor:
    """Expert of each token [S]: every expert gets floor(S/E) or ceil(S/E) tokens."""
    scores = scores.detach().float()
    S, E = scores.shape
    q = (S // E) * E  # the first q tokens fill every expert equally, the rest go one per expert
    owner = torch.empty(S, dtype=torch.long, device=scores.device)
    if q:
        main = libbase_assignment(scores[:q]) if solver == "libbase" else None
        if main is None:
            main = auction_assignment(scores[:q], torch.full((E,), q // E, device=scores.device))
        owner[:q] = main
    if q < S:
        owner[q:] = auction_assignment(scores[q:], torch.ones(E, dtype=torch.long, device=scores.device))
    return owner


@dataclass
class BaseLayerOptions(FairseqDataclass):
    base_solver: str = field(
        default="auction",
        metadata={"help": "base gate: balanced-assignment solver at training: auction (torch, any device) or "
                  "libbase (fairseq's C++ extension, checked, torch auction where it cannot answer)"},
    )


@register_gate("base", options=BaseLayerOptions)
class BaseLayerGate(RouterGate):
    def __init__(self, model_dim, num_experts, args, dictionary=None):
        super().__init__(model_dim, num_experts, args, dictionary)
        self.solver = getattr(args, "base_solver", "auction")
        if self.solver not in SOLVERS:
            raise ValueError(f"--base-solver {self.solver!r} is not valid; choose one of: {', '.join(SOLVERS)}")

    def training_refusal(self) -> Optional[str]:
        # evaluation routes by argmax and never calls the solver, so a checkpoint loads without libbase
        if self.solver == "libbase" and libbase is None:
            return ("--base-solver libbase needs fairseq's C++ extension fairseq.libbase, which is not importable "
                    "here; use --base-solver auction")
        return None

    def forward(self, x: Tensor, token_ids=None, valid=None) -> Routing:
        affinity = self.router(x)  # [S, E] fp32
        expert = affinity.argmax(dim=-1)
        if self.training and valid is None:
            expert = balanced_assignment(affinity, self.solver)
        elif self.training:  # balanced over the real tokens (a host read, see the module docstring)
            real = valid.nonzero().squeeze(1)
            expert = expert.index_copy(0, real, balanced_assignment(affinity.index_select(0, real), self.solver))
        chosen = affinity.gather(1, expert[:, None]).squeeze(1)
        weight = torch.sigmoid(chosen)
        zero = affinity.new_zeros(())
        return Routing(
            token_idx=torch.arange(x.shape[0], device=x.device),
            expert_idx=expert,
            weight=weight,
            priority=chosen.detach(),
            rank=None,
            probs=affinity.softmax(dim=-1),
            balance_loss=zero,
            z_loss=zero,
            valid=valid,
        )
