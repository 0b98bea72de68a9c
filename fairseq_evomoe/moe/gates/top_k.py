"""Switch top-1 (Fedus et al. 2021) and GShard top-2 (Lepikhin et al. 2020) gates.

top1: p = softmax(W_g x); each token goes to argmax p with weight p_max.
      Balance loss: E * sum_e f_e * P_e (Switch), f_e = share of tokens whose choice is e.
top2: the first expert is argmax p; the second is chosen by `--moe-second-expert-policy`:
      `all` (always the runner-up), `sampling` (argmax of logits + Gumbel noise among the other
      experts, as fairseq), `random` (the runner-up, kept with probability min(1, 2 w_2), its
      weight renormalised as below, as GShard's Algorithm 1; a runner-up not kept stays in the
      routing, marked invalid, so that shapes are static). Weights are w_1, w_2 = p_1 and p_2
      renormalised to sum to 1 (w_1 stays so when the runner-up is not kept). At evaluation every
      policy takes the runner-up. The balance loss counts first choices only (the GShard
      convention, also used by fairseq and DeepSpeed).
"""

from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from torch import Tensor

from .base import Gate, LinearRouter, Routing, register_gate, router_z_loss, switch_balance_loss


def gumbel_noise_like(x: Tensor) -> Tensor:
    """Standard Gumbel(0, 1) samples of x's shape, in x's dtype."""
    u = torch.rand_like(x).clamp_(min=1e-9, max=1.0 - 1e-7)
    return -torch.log(-torch.log(u))


class RouterGate(Gate):
    """A gate with a learned linear router (fp32 logits, jitter, non-finite guard)."""

    state_keys = (frozenset({"router.wg.weight"}),)

    def __init__(self, model_dim, num_experts, args, dictionary=None):
        super().__init__(model_dim, num_experts, args, dictionary)
        self.router = LinearRouter(model_dim, num_experts, jitter=getattr(args, "moe_router_jitter", 0.0))


@register_gate("top1")
class Top1Gate(RouterGate):
    def forward(self, x: Tensor, token_ids=None, valid=None) -> Routing:
        logits = self.router(x)
        probs = logits.softmax(dim=-1)
        weight, expert = probs.max(dim=-1)
        tokens = torch.arange(x.shape[0], device=x.device)
        return Routing(
            token_idx=tokens,
            expert_idx=expert,
            weight=weight,
            priority=weight.detach(),
            rank=None,
            probs=probs,
            balance_loss=switch_balance_loss(probs, expert, self.num_experts, valid),
            z_loss=router_z_loss(logits, valid),
            valid=valid,
        )


@dataclass
class Top2Options(FairseqDataclass):
    moe_second_expert_policy: str = field(
        default="sampling",
        metadata={"help": "top2 gate: how the second expert is chosen: sampling (Gumbel noise on the logits, "
                  "as fairseq), all (always the runner-up), random (runner-up kept with probability 2*w2, w2 = p2/(p1+p2), "
                  "as GShard)"},
    )


SECOND_EXPERT_POLICIES = ("sampling", "all", "random")


@register_gate("top2", options=Top2Options)
class Top2Gate(RouterGate):
    def __init__(self, model_dim, num_experts, args, dictionary=None):
        super().__init__(model_dim, num_experts, args, dictionary)
        if num_experts < 2:
            raise ValueError("--moe-gate top2 needs --moe-expert-count >= 2")
        self.policy = getattr(args, "moe_second_expert_policy", "sampling")
        if self.policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"--moe-second-expert-policy {self.policy!r} is not valid; choose one of: {', '.join(SECOND_EXPERT_POLICIES)}"
            )

    def forward(self, x: Tensor, token_ids=None, valid=None) -> Routing:
        logits = self.router(x)
        probs = logits.softmax(dim=-1)
        first = probs.argmax(dim=-1)
        first_mask = torch.nn.functional.one_hot(first, self.num_experts).bool()
        if self.training and self.policy == "sampling":
            scores2 = logits.detach() + gumbel_noise_like(logits)
        else:
            scores2 = probs.detach()
        second = scores2.masked_fill(first_mask, float("-inf")).argmax(dim=-1)

        p1 = probs.gather(1, first[:, None]).squeeze(1)
        p2 = probs.gather(1, second[:, None]).squeeze(1)
        denom = (p1 + p2).clamp(min=torch.finfo(probs.dtype).eps)
        w1, w2 = p1 / denom, p2 / denom

        tokens = torch.arange(x.shape[0], device=x.device)
        valid2 = valid
        if self.training and self.policy == "random":  # the runner-up kept with probability min(1, 2 w2)
            kept = (2 * w2.detach()) > torch.rand_like(w2)
            valid2 = kept if valid is None else kept & valid
        return Routing(
            token_idx=torch.cat([tokens, tokens]),
            expert_idx=torch.cat([first, second]),
            weight=torch.cat([w1, w2]),
            priority=torch.cat([p1, p2]).detach(),
            rank=torch.cat([torch.zeros_like(first), torch.ones_like(second)]),
            probs=probs,
            balance_loss=switch_balance_loss(probs, first, self.num_experts, valid),
            z_loss=router_z_loss(logits, valid),
            capacity_k=2,
            valid=None if valid2 is None else torch.cat([torch.ones_like(valid2) if valid is None else valid, valid2]),
        )
