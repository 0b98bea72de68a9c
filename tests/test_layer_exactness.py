"""Losses stay bit-identical on the CPU (fp32): the MoE layer step against a copy of the
implementation it had before it became free of host reads (padding removed with `nonzero`, a
capacity mask `order[keep]`, the experts on the kept assignments only).

The long experiments compare losses across commits, so the layer's output, every gradient and
every loss must be the same to the last bit, not merely close: `torch.equal`, where the other
tests use tolerances. The copy below is the old layer step, kept here only for this comparison;
it uses the layer's own gate and experts.
"""

from dataclasses import replace

import pytest
import torch

from fairseq_evomoe.evomoe.schedule import Phase
from fairseq_evomoe.moe.gates.base import count_per_expert

from moe_helpers import PAD, make_layer

# -- the old layer step (commit 905f874), for comparison only ----------------------------------


def legacy_plan(routing, num_experts, capacity, policy):
    expert = routing.expert_idx
    if capacity is None or not routing.droppable:
        return torch.argsort(expert, stable=True)
    if policy == "score":
        order = torch.argsort(routing.priority, descending=True, stable=True)
    else:
        order = torch.argsort(routing.token_idx, stable=True)
    if routing.rank is not None:
        order = order[torch.argsort(routing.rank[order], stable=True)]
    order = order[torch.argsort(expert[order], stable=True)]
    routed_counts = count_per_expert(expert, num_experts)
    starts = torch.cumsum(routed_counts, 0) - routed_counts
    position = torch.arange(order.numel()) - starts[expert[order]]
    return order[position < capacity]


def legacy_routing(routing):
    """The routing as the old gates returned it: top-2's `random` policy removed the second choices
    it withdrew (with `nonzero`), where it now marks them invalid."""
    if routing.valid is None:
        return routing
    keep = routing.valid.nonzero().squeeze(1)
    names = ("token_idx", "expert_idx", "weight", "priority", "rank")
    return replace(routing, valid=None, **{n: getattr(routing, n).index_select(0, keep) for n in names})


def legacy_forward(layer, x, token_ids):
    """The old MoELayer.forward: returns (output, routing)."""
    shape = x.shape
    x_flat = x.reshape(-1, shape[-1])
    ids_flat = token_ids.transpose(0, 1).reshape(-1)
    keep = (ids_flat != layer.padding_idx).nonzero().squeeze(1)
    x_tok, ids_tok = x_flat[keep], ids_flat[keep]
    routing = legacy_routing(layer.gate(x_tok, ids_tok))
    assign = legacy_plan(routing, layer.num_experts, layer.capacity(x_tok.shape[0], routing.capacity_k), layer.drop_policy)
    tokens = routing.token_idx[assign]
    expert_in = x_tok.index_select(0, tokens)
    counts = count_per_expert(routing.expert_idx[assign], layer.num_experts)
    expert_out = layer.experts(expert_in, counts)
    weight = routing.weight[assign].to(expert_out.dtype)
    y_tok = expert_out.new_zeros(x_tok.shape).index_add_(0, tokens, expert_out * weight.unsqueeze(1))
    out = y_tok.new_zeros(x_flat.shape).index_copy(0, keep, y_tok)
    return out.reshape(shape), routing


# -- the comparison ----------------------------------------------------------------------------

CASES = {
    "top1": dict(gate="top1"),
    "top1-jitter": dict(gate="top1", moe_router_jitter=0.1),
    "top2-sampling": dict(gate="top2", moe_second_expert_policy="sampling"),
    "top2-random": dict(gate="top2", moe_second_expert_policy="random"),
    "hash": dict(gate="hash"),
    "stablemoe": dict(gate="stablemoe"),
    "dts-hard": dict(gate="dts", dts_anneal_updates=100, evomoe_diversify_updates=0, dts_hard_update=10, num_updates=10),
    "dts-soft": dict(gate="dts", dts_anneal_updates=100, evomoe_diversify_updates=0, num_updates=50),
    "dense_moe": dict(gate="dense_moe"),
    "base": dict(gate="base"),
}


def padded_batch(T=13, B=5, M=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, T), generator=g)
    ids[0, 9:] = PAD
    ids[1, :3] = PAD
    ids[3, 4:] = PAD
    return torch.randn(T, B, M, generator=g), ids


def run(layer, forward, x, ids, seed):
    """output, losses and every gradient of one training step of `forward`."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out, routing = forward(layer, x, ids)
    losses = [routing.balance_loss, routing.z_loss] + ([routing.extra_loss] if routing.extra_loss is not None else [])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    ((out * g).sum() + sum(losses)).backward()
    grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]
    return [out.detach()] + [t.detach() for t in losses] + grads


def current_forward(layer, x, ids):
    """MoELayer.forward, and the routing its gate answered."""
    seen = []
    handle = layer.gate.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        out = layer(x, ids)
    finally:
        handle.remove()
    return out, seen[0]


@pytest.mark.parametrize("capacity_factor", [0.0, 1.25, 0.5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_step_is_bit_identical_to_the_old_one(case, capacity_factor):
    opts = dict(CASES[case])
    gate, num_updates = opts.pop("gate"), opts.pop("num_updates", None)
    layer = make_layer(gate, num_experts=4, capacity_factor=capacity_factor, **opts).train()
    if num_updates is not None:
        layer.gate.set_num_updates(num_updates)
        assert case != "dts-hard" or layer.gate.phase == Phase.HARD
    x, ids = padded_batch()
    for seed in range(2):  # two steps: the experts' reused gradient memory is used again
        want = run(layer, legacy_forward, x, ids, seed)
        got = run(layer, current_forward, x, ids, seed)
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), (case, seed, i)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_cpu_expert_kernel_is_bit_identical_to_one_linear_per_expert(activation):
    """The CPU kernel (moe/expert_cpu_kernel.py, hand-written backward) gives, to the last bit, the
    outputs and gradients of each expert run as fairseq's FFN (F.linear, autograd) on its own rows:
    the reference any faster expert path on the CPU has to match. Group sizes from 0 rows to
    several hundred, where MKL changes its method."""
    import torch.nn.functional as F

    from fairseq_evomoe.moe.experts import ExpertFFNs

    torch.manual_seed(0)
    counts = [0, 1, 7, 12, 16, 33, 300, 0]
    experts = ExpertFFNs(len(counts), 32, 128, getattr(F, activation))
    x, g = torch.randn(sum(counts), 32), torch.randn(sum(counts), 32)

    def step(forward):
        xi = x.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        (forward(xi) * g).sum().backward()
        return [xi.grad] + [p.grad.clone() for p in experts.parameters()]

    def reference(xi):
        return torch.cat([experts.forward_one(xe, e) for e, xe in enumerate(xi.split(counts))])

    with torch.no_grad():
        assert torch.equal(experts(x, counts), reference(x))
    for a, b in zip(step(lambda xi: experts(xi, counts)), step(reference)):
        assert torch.equal(a, b)
