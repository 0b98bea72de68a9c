"""The routers learn: a loss on the MoE layer's output (the task loss, not the balance loss) reaches
every learned router's weights, and the balance loss on its own moves an unbalanced router's load
towards uniform. Stand-alone layers on CPU, seeded."""

import dataclasses

import pytest
import torch

import fairseq_evomoe  # noqa: F401  (registers the gates)
from fairseq_evomoe.moe.gates.base import GATE_REGISTRY

from moe_helpers import make_layer

DTS = dict(dts_anneal_updates=100, evomoe_diversify_updates=0)

# gate configurations with a learned router: (make_layer arguments, the update counter to set)
LEARNED = {
    "top1": (dict(gate="top1"), None),
    "top2": (dict(gate="top2"), None),
    "dts-soft": (dict(gate="dts", **DTS), 50),  # tau = 1.25: several experts per token
    "dts-hard": (dict(gate="dts", dts_hard_update=10, **DTS), 10),  # top-1 by a Gumbel-max sample
    "stablemoe-stage1": (dict(gate="stablemoe"), 0),
    "dense_moe": (dict(gate="dense_moe"), None),
    "base": (dict(gate="base"), None),  # balanced assignment; the router learns from the combine weight
}


def test_every_gate_is_covered():
    """Every registered gate is either checked for router learning here or has no router at all."""
    covered = {kw["gate"] for kw, _ in LEARNED.values()}
    assert covered | {"hash"} == set(GATE_REGISTRY)
    hash_layer = make_layer("hash")
    assert list(hash_layer.gate.parameters()) == [] and not hasattr(hash_layer.gate, "router")


def learned_layer(case, seed=0):
    kw, updates = LEARNED[case]
    layer = make_layer(num_experts=4, capacity_factor=0.0, seed=seed, **kw)
    layer.train()
    if updates is not None:
        layer.gate.set_num_updates(updates)
    if case.startswith("dts"):
        assert layer.gate.phase.name == case.split("-")[1].upper()
    if case.startswith("stablemoe"):
        assert layer.gate.stage == 1
    return layer


def task_loss(layer, S=64, seed=0):
    """A regression loss on the layer's output alone (the balance, z and distillation losses the
    gate returns are left out)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, 16, generator=g)
    ids = torch.randint(4, 50, (S,), generator=g)
    target = torch.randn(S, 16, generator=g)
    torch.manual_seed(seed)
    out = layer(x, ids)
    return ((out - target) ** 2).mean()


@pytest.mark.parametrize("case", sorted(LEARNED))
def test_the_task_loss_reaches_the_router(case):
    layer = learned_layer(case)
    router = layer.gate.router.wg.weight
    task_loss(layer).backward()
    assert router.grad is not None, f"{case}: the router got no gradient from the output"
    assert torch.isfinite(router.grad).all() and router.grad.abs().sum() > 0, router.grad


@pytest.mark.parametrize("case", sorted(LEARNED))
def test_the_router_learns_through_the_combine_weight_alone(case):
    """The choice of experts is discrete, so the combine weight is the only way from the router to the
    output: with the weight detached the output gives the router nothing. (For BASE layers, whose
    balanced assignment ignores the gradient and which have no balance loss, this weight is the
    router's whole training signal.)"""
    layer = learned_layer(case)
    gate_forward = layer.gate.forward

    def detached_weight(x, token_ids=None):
        r = gate_forward(x, token_ids)
        return dataclasses.replace(r, weight=r.weight.detach())

    layer.gate.forward = detached_weight
    loss = task_loss(layer)
    assert loss.requires_grad  # the experts still learn
    loss.backward()
    router = layer.gate.router.wg.weight
    assert router.grad is None or not router.grad.any(), router.grad
    if case == "base":
        layer.gate.forward = gate_forward
        torch.manual_seed(0)
        r = layer.gate(torch.randn(32, 16), None)
        assert not r.balance_loss.requires_grad and r.balance_loss.item() == 0.0


# -- the balance loss alone ------------------------------------------------------------------------


def skewed_inputs(S=512, seed=0):
    """Hidden states with a large shared component along dimension 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, 16, generator=g)
    x[:, 0] += 3.0
    return x


def skew_router(layer, strength=1.0):
    """Make expert 0's logit grow with the shared component: most tokens go to expert 0."""
    with torch.no_grad():
        layer.gate.router.wg.weight[0, 0] += strength


def max_share(layer, x, seed=0):
    """The busiest expert's share of the routed assignments, and the balance loss, under `seed`."""
    with torch.no_grad():
        torch.manual_seed(seed)
        r = layer.gate(x, None)
    counts = torch.bincount(r.expert_idx, minlength=layer.num_experts).float()
    return (counts.max() / counts.sum()).item(), r.balance_loss.item()


BALANCED_CASES = {
    "top1": (dict(gate="top1"), None),
    # soft phase at tau = 0.119 (tau_min 0.1, update 99 of 100): one or two experts per token, so the
    # load can be skewed (at a high tau every token goes to every expert)
    "dts-soft": (dict(gate="dts", dts_tau_min=0.1, **DTS), 99),
}


@pytest.mark.parametrize("case", sorted(BALANCED_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_the_balance_loss_alone_moves_the_load_towards_uniform(case, seed):
    """A router that sends most tokens to one expert, a few SGD steps on the balance loss alone: the
    busiest expert's share and the loss go down (4 experts: uniform is a share of 0.25)."""
    kw, updates = BALANCED_CASES[case]
    layer = make_layer(num_experts=4, capacity_factor=0.0, seed=seed, **kw)
    layer.train()
    if updates is not None:
        layer.gate.set_num_updates(updates)
        assert layer.gate.phase.name == "SOFT"
    x = skewed_inputs(seed=seed)
    skew_router(layer)
    share0, loss0 = max_share(layer, x)
    assert share0 > 0.6, share0  # skewed to start with

    opt = torch.optim.SGD(layer.gate.router.parameters(), lr=0.5)
    for step in range(30):
        opt.zero_grad()
        torch.manual_seed(step)
        layer.gate(x, None).balance_loss.backward()
        opt.step()

    share1, loss1 = max_share(layer, x)
    assert share1 < min(share0 - 0.2, 0.45) and loss1 < 0.6 * loss0, (share0, share1, loss0, loss1)
