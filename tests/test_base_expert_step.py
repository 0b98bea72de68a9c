"""Before the spawn the optimizer steps the base expert alone (evomoe/base_expert_step.py): the same
update as stepping all E slots, for a fraction of the work, and nothing outside the step changes."""

import copy

import pytest
import torch

from fairseq.optim.adafactor import Adafactor
from fairseq.optim.adam import Adam as FairseqAdam
from fairseq_evomoe.evomoe.base_expert_step import base_expert_only
from fairseq_evomoe.evomoe.spawn import SpawnSettings

from moe_helpers import make_layer
from test_diversify import E, M, diversify_layer, fp16_optimizer, spawn

EXPERT_PARAMS = ("experts.fc1_weight", "experts.fc1_bias", "experts.fc2_weight", "experts.fc2_bias")


def shapes_seen_by(opt):
    """The shapes of the expert parameters during each step of torch optimizer `opt`."""
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append([tuple(p.shape) for p in o.param_groups[0]["params"]]))
    return seen


def train(layer, opt, steps, narrow, seed=0):
    """`steps` Adam steps on a fixed stream of batches, with or without base_expert_only."""
    g = torch.Generator().manual_seed(seed)
    layer.train()
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(layer(torch.randn(8, M, generator=g)).pow(2).sum())
        if narrow:
            with base_expert_only(opt, [layer]):
                opt.step()
        else:
            opt.step()


class Wrapped:
    """The shape of fairseq's optimizer wrappers around a torch optimizer (`.optimizer`)."""

    def __init__(self, opt):
        self.optimizer = opt

    def zero_grad(self):
        self.optimizer.zero_grad()

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()


OPTIMIZERS = {
    "fairseq_adam": lambda params: FairseqAdam(params, lr=1e-2),
    "torch_adam": lambda params: torch.optim.Adam(params, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_base_expert_gets_the_same_update_and_the_optimizer_sees_one_slot(name):
    a = diversify_layer()
    b = copy.deepcopy(a)
    opt_a, opt_b = Wrapped(OPTIMIZERS[name](a.parameters())), Wrapped(OPTIMIZERS[name](b.parameters()))
    seen = shapes_seen_by(opt_a.optimizer)
    train(a, opt_a, 3, narrow=True)
    train(b, opt_b, 3, narrow=False)
    # during the step: slot 0 of every expert parameter, the gate's parameters whole
    shapes = dict(zip((n for n, _ in a.named_parameters()), seen[-1]))
    for n, p in a.named_parameters():
        assert shapes[n] == ((1,) + tuple(p.shape[1:]) if n in EXPERT_PARAMS else tuple(p.shape)), n
    # after it: the same full parameters, gradients and state as stepping all E slots
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.shape == q.shape and p.grad.shape == q.grad.shape, n
        assert torch.equal(p, q), n
        state_a, state_b = opt_a.optimizer.state[p], opt_b.optimizer.state[q]
        assert state_a.keys() == state_b.keys()
        for k in state_a:
            assert torch.equal(torch.as_tensor(state_a[k]), torch.as_tensor(state_b[k])), (n, k)


def test_nothing_outside_the_step_changes_and_an_error_inside_it_restores_everything():
    layer = diversify_layer()
    opt = Wrapped(FairseqAdam(layer.parameters(), lr=1e-2))
    train(layer, opt, 2, narrow=True)
    params = dict(layer.named_parameters())
    before = {n: (p, p.data, p.grad, dict(opt.optimizer.state[p])) for n, p in params.items()}
    weights = {n: p.detach().clone() for n, p in params.items()}

    def failing_step(*args, **kwargs):
        raise RuntimeError("out of memory")

    opt.optimizer.step = failing_step
    with pytest.raises(RuntimeError, match="out of memory"):
        with base_expert_only(opt, [layer]):
            opt.step()
    for n, p in layer.named_parameters():
        obj, data, grad, state = before[n]
        assert p is obj and p.data.data_ptr() == data.data_ptr() and p.grad is grad and p.shape == data.shape, n
        assert torch.equal(p, weights[n]), n
        for k, v in opt.optimizer.state[p].items():
            assert v is state[k], (n, k)


def test_the_other_slots_keep_zero_moments_and_the_spawn_gives_them_the_base_ones():
    layer = diversify_layer()
    opt = Wrapped(FairseqAdam(layer.parameters(), lr=1e-2))
    train(layer, opt, 3, narrow=True)
    w = layer.experts.fc1_weight
    state = opt.optimizer.state[w]
    assert state["exp_avg"].shape == w.shape and state["exp_avg"][0].abs().sum() > 0
    assert not state["exp_avg"][1:].any() and not state["exp_avg_sq"][1:].any()
    from fairseq_evomoe.evomoe.spawn import spawn_optimizer_state

    spawn(layer, SpawnSettings("mask", 0.5, seed=1))
    assert spawn_optimizer_state(layer, opt)
    for e in range(1, E):
        assert torch.equal(state["exp_avg_sq"][e], state["exp_avg_sq"][0])
    # after the spawn every slot is stepped
    seen = shapes_seen_by(opt.optimizer)
    train(layer, opt, 1, narrow=True)
    assert seen[-1][[n for n, _ in layer.named_parameters()].index("experts.fc1_weight")][0] == E


def test_fp16_per_parameter_master_copies_are_narrowed_with_the_model():
    """--fp16 --fp16-no-flatten-grads: fairseq's FP16Optimizer steps fp32 masters and copies them into
    the model; with both narrowed, the model's other slots are left alone and slot 0 matches."""
    a = diversify_layer()
    b = copy.deepcopy(a)
    params_a = [p for p in a.parameters() if p.requires_grad]
    params_b = [p for p in b.parameters() if p.requires_grad]
    opt_a, opt_b = fp16_optimizer("per_param", params_a), fp16_optimizer("per_param", params_b)
    seen = shapes_seen_by(opt_a.fp32_optimizer.optimizer)
    train(a, opt_a, 3, narrow=True)
    train(b, opt_b, 3, narrow=False)
    assert seen and seen[-1][[n for n, _ in a.named_parameters()].index("experts.fc2_weight")][0] == 1
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    for m_a, m_b in zip(opt_a.fp32_params, opt_b.fp32_params):
        assert m_a.shape == m_b.shape and torch.equal(m_a, m_b)


def test_a_flat_master_copy_is_left_alone():
    layer = diversify_layer()
    opt = fp16_optimizer("flat", [p for p in layer.parameters() if p.requires_grad])
    seen = shapes_seen_by(opt.optimizer)
    train(layer, opt, 2, narrow=True)
    assert len(seen[-1]) == 1 and seen[-1][0][0] == sum(p.numel() for p in layer.parameters())


def test_adafactor_steps_the_base_expert_as_a_dense_ffn():
    """Adafactor factors the second moment of a 3-d weight into [E, rows] and [E, cols] tensors;
    they are narrowed with it (and widened back), and the other slots stay untouched."""
    layer = diversify_layer()
    start = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = Wrapped(Adafactor(layer.parameters(), lr=1e-2, relative_step=False))
    train(layer, opt, 3, narrow=True)
    for n in EXPERT_PARAMS:
        p = dict(layer.named_parameters())[n]
        assert not torch.equal(p[0], start[n][0]), n
        assert torch.equal(p[1:], start[n][1:]), n
    for n in ("experts.fc1_weight", "experts.fc2_weight"):
        p = dict(layer.named_parameters())[n]
        state = opt.optimizer.state[p]
        assert state["exp_avg_sq_row"].shape == p.shape[:-1] and state["exp_avg_sq_col"].shape == p.shape[:-2] + p.shape[-1:]


def test_adafactor_state_of_ambiguous_shape_is_stepped_whole():
    """A [E, F] bias with F == E: Adafactor's row ([E]) and column ([F]) statistics have the same
    shape, so which one is per expert cannot be told; that parameter is stepped whole (it used to
    crash with a shape error), the others still alone."""
    layer = make_layer("dts", num_experts=4, dim=M, ffn=4, capacity_factor=1.0, seed=0, diversify=True)
    start = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = Wrapped(Adafactor(layer.parameters(), lr=1e-2, relative_step=False))
    seen = shapes_seen_by(opt.optimizer)
    train(layer, opt, 3, narrow=True)
    names = [n for n, _ in layer.named_parameters()]
    assert seen[-1][names.index("experts.fc1_bias")] == (4, 4)  # ambiguous: whole
    assert seen[-1][names.index("experts.fc2_bias")] == (1, M)  # [E, M] with M != E: alone
    assert seen[-1][names.index("experts.fc1_weight")] == (4, 4, M)  # F == E: whole
    params = dict(layer.named_parameters())
    for n in EXPERT_PARAMS:
        assert not torch.equal(params[n][0], start[n][0]), n
        assert torch.equal(params[n][1:], start[n][1:]), n  # zero gradients leave them as they were
    state = opt.optimizer.state[params["experts.fc1_bias"]]
    assert state["exp_avg_sq_row"].shape == (4,) and state["exp_avg_sq_col"].shape == (4,)
