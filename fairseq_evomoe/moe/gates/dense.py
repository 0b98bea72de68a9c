"""The dense MoE gate: every expert on every token (the upper bound the DTS gate starts from).

Per token x: logits l = W_g x (fp32), p = softmax(l); output y = sum_e p_e * FFN_e(x).
As a Routing: S * E assignments (token t, expert e, weight p_{t,e}), `droppable=False`, so
capacity never drops anything (training or evaluation); `capacity_k = E` for the record.
The cost is E times a top-1 layer's expert compute.

balance loss: none (returned as 0; every expert sees every token, there is nothing to balance).
The criterion's logged balance loss is therefore 0 for this gate; routing statistics (router
entropy, experts per token = E) are still reported. z-loss: the ST-MoE router z-loss, weighted by
`--moe-z-loss-wt` (0 by default). No options of its own.
"""

from typing import Optional

import torch
from torch import Tensor

from .base import Routing, register_gate, router_z_loss
from .top_k import RouterGate


@register_gate("dense_moe")
class DenseMoEGate(RouterGate):
    def forward(self, x: Tensor, token_ids=None, valid=None) -> Routing:
        logits = self.router(x)
        return every_expert_routing(logits, logits.softmax(dim=-1), valid)


def every_expert_routing(logits: Tensor, probs: Tensor, valid: Optional[Tensor] = None) -> Routing:
    """Every token to every expert, weighted by probs [S, E]; no balance loss, nothing dropped
    (valid: the real tokens where padding stays in place, None: all)."""
    S, E = probs.shape
    tokens = torch.arange(S, device=probs.device).repeat_interleave(E)
    experts = torch.arange(E, device=probs.device).repeat(S)
    weight = probs.reshape(-1)
    return Routing(
        token_idx=tokens,
        expert_idx=experts,
        weight=weight,
        priority=weight.detach(),
        rank=None,
        probs=probs,
        balance_loss=logits.new_zeros(()),
        z_loss=router_z_loss(logits, valid),
        droppable=False,
        capacity_k=E,
        valid=None if valid is None else valid.repeat_interleave(E),
        logits=logits.detach(),
    )
