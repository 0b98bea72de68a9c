"""MoELayer: gate -> dispatch -> experts -> combine, for the FFN slot of a transformer layer.

The layer takes hidden states of any shape [..., M] and returns the same shape. Padding tokens
are never routed (their output is 0, so the residual passes them through) and never enter the
balance loss. Tokens that lose every expert to capacity also output 0.

No host synchronisation within a step: off the CPU every shape in the layer is static, so the host
never waits for the device. Padding stays in place, marked invalid for the gate and the dispatch
(`static_shapes`), and capacity drops are rows the experts skip (moe/dispatch.py). The exceptions,
at most one host read per layer each: dropless routing where the experts run batched (the largest
group, moe/experts.py), the DTS gate's soft phase (its selection per expert, which also sizes the
batched experts), expert parallelism (the all-to-all split sizes,
moe/parallel/exchange.py); and the BASE gate's solver (moe/gates/balanced.py).
On the CPU the layer removes the padding first (`nonzero`: the data is on the host, nothing to wait
for), so that means over tokens and random draws cover exactly the real tokens, and losses stay
identical to the last bit to those of the layer before it became static (a sum over rows with
zero rows in between rounds differently; a draw over more rows moves every later random number).

After each forward the layer leaves `self.metadata`, which the MoE criteria read: its balance loss
and z-loss (tensors in the graph) and its kept assignments (one detached scalar, for the expert
compute count); the routing statistics (detached tensors, no host sync) only when `collect_stats`
is set, which the MoE criteria do for validation and for the training updates fairseq logs: between
log lines and at generation a layer computes nothing else.
"""

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .dispatch import DispatchPlan, expert_capacity, plan_dispatch
from .experts import ExpertFFNs
from .gates.base import Gate, Routing, token_mean
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
        # padding left in place (True) or removed first (False); None: removed on the CPU only
        self.static_shapes: Optional[bool] = None
        self.num_updates = 0  # fairseq's update counter, pushed before each training step
        self.collect_stats = False
        # why this layer must not train, e.g. a --criterion that adds none of the MoE losses (set by
        # the model builder from the command line): training refuses at the first forward with it;
        # evaluation and generation run
        self.training_refused: Optional[str] = None

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

    def routes_dense_to_sparse(self) -> bool:
        """Whether the layer's gate routes it dense-to-sparse now (the DTS gate's soft phase)."""
        return self.gate_routes and self.gate.routes_dense_to_sparse()

    def reset_schedule(self) -> None:
        """Back to the routing schedule's start, as built (for weights that come from a dense model)."""
        self.gate.reset_schedule()

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> Tensor:
        """x: [T, B, M] (fairseq's layout) or [S, M]; token_ids: [B, T] / [S] or None."""
        if self.training and self.training_refused is not None:
            raise ValueError(self.training_refused)
        if token_ids is None:
            token_ids = self.routing_tokens
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        ids_flat = None
        if token_ids is not None:
            ids_flat = (token_ids.transpose(0, 1) if x.dim() == 3 else token_ids).reshape(-1)
            assert ids_flat.numel() == x_flat.shape[0], "routing tokens do not match the hidden states"
        if ids_flat is None or self.padding_idx is None:
            return self.forward_tokens(x_flat, ids_flat).reshape(shape)
        real = ids_flat != self.padding_idx
        static = self.static_shapes if self.static_shapes is not None else x.device.type != "cpu"
        if static:
            return self.forward_tokens(x_flat, ids_flat, valid=real).reshape(shape)
        keep = real.nonzero().squeeze(1)
        y_tok = self.forward_tokens(x_flat[keep], ids_flat[keep])
        # in y_tok's dtype: under --amp (autocast) the experts' matmuls return fp16 for fp32 input,
        # as a dense FFN's would
        out = y_tok.new_zeros(x_flat.shape)
        out = out.index_copy(0, keep, y_tok)
        return out.reshape(shape)

    def reset_experts(self, std: float) -> None:
        """normal(0, std) expert weights, zero biases (BERT-style init), as one process draws them."""
        reset_experts(self.experts, self.placement, std)

    def capacity(self, num_tokens, k: int):
        """Assignments each expert may keep (None: dropless); num_tokens: an int, or a LongTensor
        scalar on the device (then so is the capacity)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, factor, k)

    def dispatch_plan(self, routing: Routing, num_rows: int, valid: Optional[Tensor]) -> DispatchPlan:
        """The dispatch plan of `routing` for num_rows tokens, of which `valid` are real (None: all)."""
        num_tokens = num_rows if valid is None else valid.sum()
        max_rows = self.capacity(num_rows, routing.capacity_k) if routing.droppable else routing.max_per_expert
        return plan_dispatch(routing, self.num_experts, self.capacity(num_tokens, routing.capacity_k), self.drop_policy,
                             max_rows)

    def forward_tokens(self, x: Tensor, token_ids: Optional[Tensor], valid: Optional[Tensor] = None) -> Tensor:
        """The mixture on the tokens x [S, M] (token_ids [S] or None); valid [S] marks the real ones
        (None: all are), the others output 0."""
        # (valid only where padding stays in place: a gate written for token ids alone still runs on the CPU)
        routing = self.gate(x, token_ids) if valid is None else self.gate(x, token_ids, valid=valid)
        plan = self.dispatch_plan(routing, x.shape[0], valid)
        tokens = routing.token_idx[plan.order]
        # index_select, not x[tokens]: its backward accumulates repeated tokens deterministically on CPU
        expert_in = x.index_select(0, tokens)
        expert_out = run_experts(self.placement, self.experts, expert_in, plan.counts, plan.max_rows)
        weight = routing.weight[plan.order].to(expert_out.dtype)
        # assignments not kept add to a scratch row after the last token
        target = torch.where(plan.kept_mask(), tokens, x.shape[0])
        out = expert_out.new_zeros(x.shape[0] + 1, x.shape[1]).index_add_(0, target, expert_out * weight.unsqueeze(1))
        self.metadata = self.routing_stats(routing, plan, x.shape[0], target, valid)
        return out[:-1]

    def routing_stats(self, routing: Routing, plan: DispatchPlan, num_rows: int, target: Tensor,
                      valid: Optional[Tensor]) -> Dict[str, Tensor]:
        """The layer's losses and its kept assignments (for the expert compute count) on every
        forward; the routing statistics only when `collect_stats` is set. target: the token of each
        assignment in plan order, num_rows for those not kept."""
        stats = {"balance_loss": routing.balance_loss.float(), "z_loss": routing.z_loss.float()}
        if routing.extra_loss is not None:
            stats["extra_loss"] = routing.extra_loss.float()
        with torch.no_grad():
            stats["kept_assignments"] = plan.counts.sum().double()
            if not self.collect_stats:
                return stats
            num_tokens = torch.tensor(float(num_rows)) if valid is None else valid.sum().float()
            n = num_tokens.clamp(min=1)
            routed = plan.routed_counts.float()
            served = target.new_zeros(num_rows + 1, dtype=torch.bool).index_fill_(0, target, True)[:-1]
            stats.update({
                "num_tokens": num_tokens,
                "tokens_per_expert": plan.counts.float(),
                "routed_per_expert": routed,
                # assignments (token, expert) dropped by capacity, over those routed
                "dropped_frac": plan.num_dropped.float() / routed.sum().clamp(min=1),
                # routed assignments per token, before capacity
                "experts_per_token": routed.sum() / n,
                # tokens that kept no expert (their output is 0: the residual passes them through)
                "tokens_unserved": num_tokens - served.sum(),
            })
            if routing.probs is not None and routing.probs.shape[0] > 0:
                p = routing.probs.float()
                stats["router_entropy"] = -token_mean((p * torch.log(p.clamp(min=1e-9))).sum(-1), valid)
            else:
                stats["router_entropy"] = torch.tensor(0.0)
            stats.update(router_stats(routing, valid))
            for name, count in (routing.token_counts or {}).items():
                stats[f"token_count_{name}"] = count.detach().float()
        return stats

    # -- a slow, obviously correct reference, for tests only ---------------------------------

    def reference_forward(self, x: Tensor, routing: Routing, plan: DispatchPlan) -> Tensor:
        """Every expert on every token, mixed by a dense [S, E] weight matrix built from `plan`."""
        assign = plan.kept()
        combine = x.new_zeros(x.shape[0], self.num_experts, dtype=torch.float)
        combine = combine.index_put(
            (routing.token_idx[assign], routing.expert_idx[assign]), routing.weight[assign].float(), accumulate=True
        )
        out = x.new_zeros(x.shape)
        for e in range(self.num_experts):
            out = out + self.experts.forward_one(x, e) * combine[:, e : e + 1].to(x.dtype)
        return out


def router_stats(routing: Routing, valid: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Sampled statistics ("stat_<name>": [sum, count]) of a routing over its real tokens (valid
    [S], None: all): the mean over tokens of the std of the router logits over experts
    (router_logit_std) and of the gap between the two largest logits (router_top_gap), beside
    Gumbel(0, 1) noise's std of 1.28 the scale at which the noise decides; and the gate's own
    sampled statistics."""
    out: Dict[str, Tensor] = {}
    with torch.no_grad():
        logits = routing.logits
        if logits is None and routing.probs is not None:
            logits = torch.log(routing.probs.float().clamp(min=torch.finfo(torch.float).tiny))
        if logits is not None and logits.shape[0] > 0 and logits.shape[1] > 1:
            logits = logits.float()
            top2 = logits.topk(2, dim=-1).values
            spread, gap = logits.std(dim=-1, unbiased=False), top2[:, 0] - top2[:, 1]
            if valid is None:
                n = logits.new_tensor(float(logits.shape[0]))
            else:
                n = valid.sum().float()
                spread, gap = torch.where(valid, spread, 0.0), torch.where(valid, gap, 0.0)
            out["stat_router_logit_std"] = torch.stack([spread.sum(), n])
            out["stat_router_top_gap"] = torch.stack([gap.sum(), n])
        for name, (total, count) in (routing.sampled_stats or {}).items():
            out[f"stat_{name}"] = torch.stack([total.detach().float(), count.detach().float()])
    return out


def moe_layers(module: nn.Module) -> List[MoELayer]:
    """The MoE layers inside a module (a model, an encoder, a stack of layers), in order."""
    return [m for m in module.modules() if isinstance(m, MoELayer)]
