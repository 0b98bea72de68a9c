"""Builders shared by the unit tests: a stand-alone MoE layer for a given gate."""

from argparse import Namespace

import torch
import torch.nn.functional as F

import fairseq_evomoe  # noqa: F401  (registers gates)
from fairseq_evomoe.moe import options as moe_options
from fairseq_evomoe.moe.dispatch import plan_dispatch
from fairseq_evomoe.moe.experts import ExpertFFNs
from fairseq_evomoe.moe.gates.base import build_gate
from fairseq_evomoe.moe.layer import MoELayer

PAD = 1


def moe_args(**overrides) -> Namespace:
    args = Namespace(**overrides)
    moe_options.apply_defaults(args)
    return args


def make_layer(gate="top1", num_experts=4, dim=16, ffn=32, capacity_factor=0.0, eval_capacity_factor=0.0,
               drop_policy="score", seed=0, **gate_args) -> MoELayer:
    torch.manual_seed(seed)
    args = moe_args(moe_gate=gate, moe_expert_count=num_experts, **gate_args)
    experts = ExpertFFNs(num_experts, dim, ffn, F.relu, 0.0)
    layer = MoELayer(build_gate(gate, dim, num_experts, args), experts, capacity_factor=capacity_factor,
                     eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy, padding_idx=PAD)
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
    fast = layer.sparse_forward(x, token_ids)
    return fast, ref
