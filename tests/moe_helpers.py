"""Builders shared by the unit tests: a stand-alone MoE layer for a given gate."""

import math
from argparse import Namespace

import torch
import torch.nn.functional as F

import fairseq_evomoe  # noqa: F401  (registers gates)
from fairseq_evomoe.moe import options as moe_options
from fairseq_evomoe.moe.dispatch import plan_dispatch
from fairseq_evomoe.moe.experts import ExpertFFNs
from fairseq_evomoe.moe.gates.base import build_gate
from fairseq_evomoe.evomoe.expert_diversify import DiversifyingMoELayer, DiversifyPlan
from fairseq_evomoe.evomoe.spawn import SpawnSettings
from fairseq_evomoe.moe.layer import MoELayer

PAD = 1


def moe_args(**overrides) -> Namespace:
    args = Namespace(**overrides)
    moe_options.apply_defaults(args)
    return args


def make_layer(gate="top1", num_experts=4, dim=16, ffn=32, capacity_factor=0.0, eval_capacity_factor=0.0,
               drop_policy="score", seed=0, diversify=False, stats=True, **gate_args) -> MoELayer:
    """stats: the layer computes its routing statistics on every forward (as when a step logs).
    diversify: an EvoMoE layer in its expert-diversify phase (not spawned; the controller or
    `layer.spawn()` spawns it), with this DiversifyPlan (True: one that never spawns by itself);
    else a plain MoELayer."""
    torch.manual_seed(seed)
    args = moe_args(moe_gate=gate, moe_expert_count=num_experts, **gate_args)
    experts = ExpertFFNs(num_experts, dim, ffn, F.relu, 0.0)
    options = dict(capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                   drop_policy=drop_policy, padding_idx=PAD)
    gate = build_gate(gate, dim, num_experts, args)
    if diversify:
        plan = diversify if isinstance(diversify, DiversifyPlan) else DiversifyPlan(updates=10**9, spawn=SpawnSettings())
        layer = DiversifyingMoELayer(gate, experts, plan, **options)
    else:
        layer = MoELayer(gate, experts, **options)
    layer.collect_stats = stats  # the routing statistics, as on a step fairseq logs
    return layer


def fast_and_reference(layer: MoELayer, x: torch.Tensor, token_ids=None, seed=0):
    """Run the fast path and the dense reference on the same routing decision.

    Returns (fast_output, reference_output) for the non-padding tokens in x [S, M].
    """
    torch.manual_seed(seed)
    routing = layer.gate(x, token_ids)
    plan = plan_dispatch(routing, layer.num_experts, layer.capacity(x.shape[0], routing.capacity_k), layer.drop_policy)
    ref = layer.reference_forward(x, routing, plan)
    torch.manual_seed(seed)
    fast = layer.forward_tokens(x, token_ids)
    return fast, ref


# -- an independent reference for MoELayer.forward ------------------------------------------------
#
# It shares nothing with the layer's dispatch: it removes padding with a Python loop over positions,
# applies the documented capacity rule itself (moe/dispatch.py) and runs every expert on every
# token, mixed by a dense [S, E] weight matrix. Only the gate's Routing is reused, because the gate
# may be random (top2 random/sampling, DTS Gumbel noise): the routing the layer's own gate call
# produced is recorded and handed to the reference.


def reference_capacity(factor: float, k: int, num_tokens: int, num_experts: int, droppable: bool):
    """Assignments an expert may keep: ceil(factor * k * S / E) on the S non-padding tokens;
    None (keep all) for factor 0 or a routing that must not drop."""
    if factor == 0 or not droppable:
        return None
    return max(1, math.ceil(factor * k * num_tokens / num_experts))


def reference_kept(routing, num_experts: int, capacity, policy: str):
    """Indices of the assignments that survive capacity, by the documented rule: within an expert,
    earlier choice rank first, then higher priority ("score") or lower token index ("position");
    ties keep the original assignment order; an expert keeps its first `capacity`. Invalid
    assignments (Routing.valid) are never kept."""
    expert = routing.expert_idx.tolist()
    valid = routing.valid.tolist() if routing.valid is not None else [True] * len(expert)
    token = routing.token_idx.tolist()
    priority = routing.priority.tolist()
    rank = routing.rank.tolist() if routing.rank is not None else [0] * len(expert)
    if policy == "score":
        key = lambda i: (rank[i], -priority[i])  # noqa: E731
    elif policy == "position":
        key = lambda i: (rank[i], token[i])  # noqa: E731
    else:
        raise ValueError(policy)
    kept = []
    for e in range(num_experts):
        mine = sorted((i for i in range(len(expert)) if expert[i] == e and valid[i]), key=key)  # sorted() is stable
        kept += mine if capacity is None else mine[:capacity]
    return sorted(kept)


def forward_recording_routing(layer: MoELayer, x: torch.Tensor, token_ids: torch.Tensor, seed: int = 0):
    """MoELayer.forward(x, token_ids) under a seed; returns (output, gate_args, routing): what the
    layer's single gate call was given and answered."""
    seen = []
    handle = layer.gate.register_forward_hook(lambda mod, args, kwargs, out: seen.append((args, kwargs, out)),
                                              with_kwargs=True)
    try:
        torch.manual_seed(seed)
        out = layer(x, token_ids)
    finally:
        handle.remove()
    assert len(seen) == 1, f"the gate was called {len(seen)} times in one forward"
    args, kwargs, routing = seen[0]
    gate_x = args[0] if args else kwargs["x"]
    gate_ids = args[1] if len(args) > 1 else kwargs.get("token_ids")
    return out, (gate_x, gate_ids), routing


def reference_layer_forward(layer: MoELayer, x: torch.Tensor, token_ids: torch.Tensor, routing):
    """The layer's output for x [T, B, M] and token_ids [B, T] (padding = layer.padding_idx), given
    the gate's routing of the non-padding tokens. Returns (output [T, B, M], real_x [S, M],
    real_ids [S], kept assignment indices, capacity)."""
    T, B, M = x.shape
    E = layer.num_experts
    # the non-padding positions, in the order the layer flattens [T, B] (time-major)
    real = [(t, b) for t in range(T) for b in range(B) if int(token_ids[b, t]) != layer.padding_idx]
    x_real = torch.stack([x[t, b] for t, b in real])
    ids_real = torch.tensor([int(token_ids[b, t]) for t, b in real])

    factor = layer.capacity_factor if layer.training else layer.eval_capacity_factor
    capacity = reference_capacity(factor, routing.capacity_k, len(real), E, routing.droppable)
    kept = reference_kept(routing, E, capacity, layer.drop_policy)

    idx = torch.tensor(kept, dtype=torch.long)
    combine = torch.zeros(len(real), E).index_put(
        (routing.token_idx[idx], routing.expert_idx[idx]), routing.weight[idx].float(), accumulate=True
    )
    y_real = torch.zeros_like(x_real)
    for e in range(E):
        y_real = y_real + layer.experts.forward_one(x_real, e) * combine[:, e : e + 1].to(x.dtype)

    row = {pos: j for j, pos in enumerate(real)}
    zero = x.new_zeros(M)
    out = torch.stack([y_real[row[(t, b)]] if (t, b) in row else zero for t in range(T) for b in range(B)])
    return out.view(T, B, M), x_real, ids_real, kept, capacity
