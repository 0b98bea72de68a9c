"""MoELayer: gate -> dispatch -> experts -> combine, for the FFN slot of a transformer layer.

The layer takes hidden states of any shape [..., M] and returns the same shape. Padding tokens
are never routed (their output is 0, so the residual passes them through) and never enter the
balance loss. Tokens that lose every expert to capacity also output 0.

After each forward the layer leaves `self.metadata`: its balance loss and z-loss (tensors in the
graph) and routing statistics (detached tensors, no host sync), which the MoE criteria read.
Statistics only wanted on steps that log (the router's logit spread, the gate's sampled
statistics) are computed when `collect_stats` is set: the MoE criteria set it for validation and
for training steps that fairseq logs, never at generation.
"""

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .dispatch import DispatchPlan, expert_capacity, plan_dispatch
from .experts import ExpertFFNs
from .gates.base import Gate, Routing
from .parallel.exchange import run_experts
from .parallel.placement import ExpertPlacement
from .parallel.sharding import reset_experts


class MoELayer(nn.Module):
    def __init__(
        self,
        gate: Gate,
        experts: ExpertFFNs,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 0.0,
        drop_policy: str = "score",
        padding_idx: Optional[int] = None,
        placement: Optional[ExpertPlacement] = None,
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.num_experts = gate.num_experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor < 0 else eval_capacity_factor
        self.drop_policy = drop_policy
        self.padding_idx = padding_idx
        self.placement = placement if placement is not None else ExpertPlacement.single_process(self.num_experts)
        self.layer_name = ""  # set by the model, used in logs
        self.metadata: Dict[str, Tensor] = {}
        # token ids [batch, time] of the current forward, set by the encoder/decoder (RoutingContext)
        self.routing_tokens: Optional[Tensor] = None
        self.num_updates = 0  # fairseq's update counter, pushed before each training step
        self.collect_stats = False

    @property
    def collect_stats(self) -> bool:
        """Whether this forward also computes the statistics only wanted on steps that log."""
        return self._collect_stats

    @collect_stats.setter
    def collect_stats(self, value: bool) -> None:
        self._collect_stats = value
        self.gate.collect_stats = value

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this on every module before each training step and on checkpoint load."""
        self.num_updates = num_updates

    @property
    def gate_routes(self) -> bool:
        """Whether the gate routes this layer's tokens (a subclass may run its experts otherwise
        for a while; the criterion then logs no per-expert load)."""
        return True

    def state_for_logging(self) -> Dict[str, float]:
        """Scalars about the layer's schedule (the gate's temperature, phase...) for the criterion."""
        return self.gate.state_for_logging()

    def reset_schedule(self) -> None:
        """Back to the routing schedule's start, as built (for weights that come from a dense model)."""
        self.gate.reset_schedule()

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> Tensor:
        """x: [T, B, M] (fairseq's layout) or [S, M]; token_ids: [B, T] / [S] or None."""
        if token_ids is None:
            token_ids = self.routing_tokens
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        ids_flat = None
        if token_ids is not None:
            ids_flat = (token_ids.transpose(0, 1) if x.dim() == 3 else token_ids).reshape(-1)
            assert ids_flat.numel() == x_flat.shape[0], "routing tokens do not match the hidden states"
        if ids_flat is not None and self.padding_idx is not None:
            keep = (ids_flat != self.padding_idx).nonzero().squeeze(1)
            x_tok, ids_tok = x_flat[keep], ids_flat[keep]
        else:
            keep, x_tok, ids_tok = None, x_flat, ids_flat

        y_tok = self.forward_tokens(x_tok, ids_tok)
        if keep is None:
            return y_tok.reshape(shape)
        # in y_tok's dtype: under --amp (autocast) the experts' matmuls return fp16 for fp32 input,
        # as a dense FFN's would
        out = y_tok.new_zeros(x_flat.shape)
        out = out.index_copy(0, keep, y_tok)
        return out.reshape(shape)

    def reset_experts(self, std: float) -> None:
        """normal(0, std) expert weights, zero biases (BERT-style init), as one process draws them."""
        reset_experts(self.experts, self.placement, std)

    def capacity(self, num_tokens: int, k: int) -> Optional[int]:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, factor, k)

    def forward_tokens(self, x: Tensor, token_ids: Optional[Tensor]) -> Tensor:
        """The mixture on the non-padding tokens x [S, M] (token_ids [S] or None)."""
        routing = self.gate(x, token_ids)
        plan = plan_dispatch(routing, self.num_experts, self.capacity(x.shape[0], routing.capacity_k), self.drop_policy)
        assign = plan.order
        tokens = routing.token_idx[assign]
        # index_select, not x[tokens]: its backward accumulates repeated tokens deterministically on CPU
        expert_in = x.index_select(0, tokens)
        expert_out = run_experts(self.placement, self.experts, expert_in, plan.counts)
        weight = routing.weight[assign].to(expert_out.dtype)
        out = expert_out.new_zeros(x.shape).index_add_(0, tokens, expert_out * weight.unsqueeze(1))
        self.metadata = self.routing_stats(routing, plan, x.shape[0], tokens)
        return out

    def routing_stats(self, routing: Routing, plan: DispatchPlan, num_tokens: int, kept_tokens: Tensor) -> Dict[str, Tensor]:
        """kept_tokens: the token of every kept assignment."""
        with torch.no_grad():
            n = max(num_tokens, 1)
            routed = plan.routed_counts.float()
            served = kept_tokens.new_zeros(num_tokens, dtype=torch.bool).index_fill_(0, kept_tokens, True)
            stats = {
                "num_tokens": torch.tensor(float(num_tokens)),
                "tokens_per_expert": plan.counts.float(),
                "routed_per_expert": routed,
                # assignments (token, expert) dropped by capacity, over those routed
                "dropped_frac": plan.num_dropped.float() / routed.sum().clamp(min=1),
                # routed assignments per token, before capacity
                "experts_per_token": routed.sum() / n,
                # tokens that kept no expert (their output is 0: the residual passes them through)
                "tokens_unserved": (num_tokens - served.sum()).float(),
            }
            if routing.probs is not None and routing.probs.shape[0] > 0:
                p = routing.probs.float()
                stats["router_entropy"] = -(p * torch.log(p.clamp(min=1e-9))).sum(-1).mean()
            else:
                stats["router_entropy"] = torch.tensor(0.0)
        if self.collect_stats:
            stats.update(router_stats(routing))
        stats["balance_loss"] = routing.balance_loss.float()
        stats["z_loss"] = routing.z_loss.float()
        if routing.extra_loss is not None:
            stats["extra_loss"] = routing.extra_loss.float()
        for name, count in (routing.token_counts or {}).items():
            stats[f"token_count_{name}"] = count.detach().float()
        return stats

    # -- a slow, obviously correct reference, for tests only ---------------------------------

    def reference_forward(self, x: Tensor, routing: Routing, plan: DispatchPlan) -> Tensor:
        """Every expert on every token, mixed by a dense [S, E] weight matrix built from `plan`."""
        assign = plan.order
        combine = x.new_zeros(x.shape[0], self.num_experts, dtype=torch.float)
        combine = combine.index_put(
            (routing.token_idx[assign], routing.expert_idx[assign]), routing.weight[assign].float(), accumulate=True
        )
        out = x.new_zeros(x.shape)
        for e in range(self.num_experts):
            out = out + self.experts.forward_one(x, e) * combine[:, e : e + 1].to(x.dtype)
        return out


def router_stats(routing: Routing) -> Dict[str, Tensor]:
    """Sampled statistics ("stat_<name>": [sum, count]) of a routing: the mean over tokens of the
    std of the router logits over experts (router_logit_std) and of the gap between the two largest
    logits (router_top_gap), beside Gumbel(0, 1) noise's std of 1.28 the scale at which the noise
    decides; and the gate's own sampled statistics."""
    out: Dict[str, Tensor] = {}
    with torch.no_grad():
        logits = routing.logits
        if logits is None and routing.probs is not None:
            logits = torch.log(routing.probs.float().clamp(min=torch.finfo(torch.float).tiny))
        if logits is not None and logits.shape[0] > 0 and logits.shape[1] > 1:
            logits = logits.float()
            n = logits.new_tensor(float(logits.shape[0]))
            top2 = logits.topk(2, dim=-1).values
            out["stat_router_logit_std"] = torch.stack([logits.std(dim=-1, unbiased=False).sum(), n])
            out["stat_router_top_gap"] = torch.stack([(top2[:, 0] - top2[:, 1]).sum(), n])
        for name, (total, count) in (routing.sampled_stats or {}).items():
            out[f"stat_{name}"] = torch.stack([total.detach().float(), count.detach().float()])
    return out


def moe_layers(module: nn.Module) -> List[MoELayer]:
    """The MoE layers inside a module (a model, an encoder, a stack of layers), in order."""
    return [m for m in module.modules() if isinstance(m, MoELayer)]
