"""Expert-diversify: the dense base expert, spawning modes, the fresh gate, optimizer state, spawn once."""

from argparse import Namespace
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fairseq_evomoe.evomoe.controller import PhaseController
from fairseq_evomoe.evomoe.expert_diversify import DiversifyPlan
from fairseq_evomoe.evomoe.spawn import SpawnSettings, spawn_optimizer_state
from fairseq_evomoe.evomoe.stepped_copies import stepped_copies

from moe_helpers import make_layer

E, M, FF = 4, 16, 32


def diversify_layer(gate="dts", seed=0):
    layer = make_layer(gate, num_experts=E, dim=M, ffn=FF, capacity_factor=1.0, seed=seed, diversify=True)
    layer.layer_name = "dec1"
    return layer


def spawn(layer, settings: SpawnSettings) -> None:
    layer.plan = replace(layer.plan, spawn=settings)
    layer.spawn()


def base_ffn(layer, x):
    ex = layer.experts
    return F.linear(F.relu(F.linear(x, ex.fc1_weight[0], ex.fc1_bias[0])), ex.fc2_weight[0], ex.fc2_bias[0])


def test_before_the_spawn_the_layer_is_the_dense_base_ffn():
    layer = diversify_layer()
    layer.train()
    x = torch.randn(5, 3, M)
    out = layer(x)
    torch.testing.assert_close(out, base_ffn(layer, x))
    assert layer.metadata["experts_per_token"].item() == 1.0
    assert layer.metadata["balance_loss"].item() == 0.0
    out.sum().backward()
    assert layer.gate.router.wg.weight.grad is not None
    assert torch.all(layer.gate.router.wg.weight.grad == 0), "the gate must get no signal before the spawn"
    assert torch.all(layer.experts.fc1_weight.grad[1:] == 0)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_mask_spawn_masks_the_requested_fraction(ratio):
    layer = diversify_layer()
    base = layer.experts.fc1_weight[0].clone()
    spawn(layer, SpawnSettings("mask", ratio, rescale=False, seed=3))
    w = layer.experts.fc1_weight
    for e in range(E):
        kept = w[e] != 0
        assert torch.equal(w[e][kept], base[kept]), "kept weights are the base expert's"
    masked = (w == 0).float().mean().item()
    sigma = (ratio * (1 - ratio) / w.numel()) ** 0.5
    assert masked == pytest.approx(ratio, abs=4 * sigma)
    assert not torch.equal(w[0], w[1]), "experts must differ"
    assert layer.is_spawned


def test_mask_spawn_rescale():
    layer = diversify_layer()
    base = layer.experts.fc2_weight[0].clone()
    spawn(layer, SpawnSettings("mask", 0.5, rescale=True, seed=3))
    w = layer.experts.fc2_weight[2]
    kept = w != 0
    torch.testing.assert_close(w[kept], base[kept] * 2)


def test_reinit_copy_and_noise_spawns():
    layer = diversify_layer()
    base = layer.experts.fc1_weight[0].clone()
    spawn(layer, SpawnSettings("reinit", 0.5, seed=1))
    w = layer.experts.fc1_weight
    same = w[1] == base
    assert 0.4 < same.float().mean().item() < 0.6
    assert (w[1][~same].abs() <= 1 / M**0.5 + 1e-6).all(), "re-initialised weights follow nn.Linear's init"

    layer = diversify_layer()
    base = layer.experts.fc1_weight[0].clone()
    spawn(layer, SpawnSettings("copy", seed=1))
    assert all(torch.equal(layer.experts.fc1_weight[e], base) for e in range(E))

    layer = diversify_layer()
    base = layer.experts.fc1_weight[0].clone()
    spawn(layer, SpawnSettings("noise", noise_scale=0.1, seed=1))
    diff = layer.experts.fc1_weight[3] - base
    assert diff.abs().max() > 0
    assert diff.std().item() == pytest.approx(0.1 * base.std().item(), rel=0.2)


def test_spawn_is_seeded_and_refreshes_the_gate():
    a, b = diversify_layer(seed=0), diversify_layer(seed=0)
    gate_before = a.gate.router.wg.weight.clone()
    spawn(a, SpawnSettings("mask", 0.5, seed=7))
    spawn(b, SpawnSettings("mask", 0.5, seed=7))
    assert torch.equal(a.experts.fc1_weight, b.experts.fc1_weight)
    assert torch.equal(a.gate.router.wg.weight, b.gate.router.wg.weight)
    assert not torch.equal(a.gate.router.wg.weight, gate_before), "the gate is freshly initialised"
    c = diversify_layer(seed=0)
    spawn(c, SpawnSettings("mask", 0.5, seed=8))
    assert not torch.equal(a.experts.fc1_weight, c.experts.fc1_weight)


def test_spawned_experts_inherit_the_base_optimizer_moments_and_the_gate_starts_fresh():
    layer = diversify_layer()
    layer.train()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, M)).pow(2).sum().backward()
        opt.step()
    spawn(layer, SpawnSettings("mask", 0.5, seed=1))
    wrapper = Namespace(optimizer=opt)  # the shape of fairseq's optimizer wrappers
    assert spawn_optimizer_state(layer, wrapper)
    state = opt.state[layer.experts.fc1_weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key][0].abs().sum() > 0
        for e in range(1, E):
            assert torch.equal(state[key][e], state[key][0])
    assert layer.gate.router.wg.weight not in opt.state
    # training goes on and updates every expert
    before = layer.experts.fc1_weight.detach().clone()
    opt.zero_grad()
    layer(torch.randn(64, M)).pow(2).sum().backward()
    opt.step()
    changed = (layer.experts.fc1_weight.detach() != before).flatten(1).any(1)
    assert changed.all()


def test_controller_spawns_exactly_once():
    layer = diversify_layer()
    layer.plan = DiversifyPlan(updates=5, spawn=SpawnSettings("mask", 0.5, seed=1))
    model = torch.nn.Sequential(layer)
    model.set_num_updates = lambda n: None
    ctl = PhaseController()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    ctl.before_train_step(model, Namespace(optimizer=opt), 4)
    assert not layer.is_spawned
    ctl.before_train_step(model, Namespace(optimizer=opt), 5)
    assert layer.is_spawned
    after = layer.experts.fc1_weight.clone()
    ctl.before_train_step(model, Namespace(optimizer=opt), 6)  # e.g. after a resume past the spawn
    assert torch.equal(layer.experts.fc1_weight, after)
    assert "spawned" in dict(layer.named_buffers()), "the spawn is recorded in checkpoints"


class FlatMasterOptimizer:
    """fairseq's FP16Optimizer with flattened params, as far as the spawn sees it (that one needs
    CUDA to build): `fp16_params` (the model's), `fp32_params` ({device index: one flat fp32
    master}), `optimizer` (steps the master), and the copy back into the model after each step."""

    def __init__(self, params):
        self.fp16_params = list(params)
        flat = torch.cat([p.detach().reshape(-1).float() for p in self.fp16_params])
        self.fp32_params = {None: torch.nn.Parameter(flat)}
        self.optimizer = torch.optim.Adam([self.fp32_params[None]], lr=1e-3)

    def backward(self, loss):
        loss.backward()

    def zero_grad(self):
        for p in self.fp16_params:
            p.grad = None

    def step(self):
        flat = self.fp32_params[None]
        flat.grad = torch.cat([p.grad.reshape(-1).float() for p in self.fp16_params])
        self.optimizer.step()
        offset = 0
        for p in self.fp16_params:
            p.data.copy_(flat.data[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def fp16_optimizer(kind, params):
    """`flat`: the stand-in above; `per_param` (--fp16 --fp16-no-flatten-grads) and `fairseq_flat`
    (plain --fp16, CUDA only): fairseq's own FP16Optimizer."""
    if kind == "flat":
        return FlatMasterOptimizer(params)
    from fairseq.optim import FP16Optimizer
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({  # what --fp16 [--fp16-no-flatten-grads] --optimizer adam gives it
        "optimizer": {"_name": "adam", "lr": [1e-3]},
        "common": {"fp16_no_flatten_grads": kind == "per_param", "bf16": False, "fp16_init_scale": 1,
                   "fp16_scale_window": None, "fp16_scale_tolerance": 0.0, "threshold_loss_scale": None,
                   "min_loss_scale": 1e-4, "model_parallel_size": 1, "tpu": False},
        "optimization": {"update_freq": [1]},
        "distributed_training": {"distributed_world_size": 1},
    })
    return FP16Optimizer.build_optimizer(cfg, list(params))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fairseq's flat FP16Optimizer needs CUDA")


@pytest.mark.parametrize("kind", ["flat", "per_param", pytest.param("fairseq_flat", marks=needs_cuda)])
def test_spawn_reaches_the_fp32_master_copies(kind):
    """Under --fp16/--bf16 fairseq steps fp32 master copies and writes them back into the model:
    the spawned weights and the fresh gate must be in those copies, or the first step undoes them."""
    layer = diversify_layer()
    if kind == "fairseq_flat":
        layer = layer.cuda().half()
    dev, dtype = layer.experts.fc1_weight.device, layer.experts.fc1_weight.dtype
    layer.train()
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = fp16_optimizer(kind, params)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(layer(torch.randn(8, M, device=dev, dtype=dtype)).pow(2).sum())
        opt.step()
    spawn(layer, SpawnSettings("mask", 0.5, seed=1))
    spawned = {n: p.detach().clone() for n, p in layer.named_parameters()}
    assert spawn_optimizer_state(layer, opt)
    copies = dict(zip(spawned, stepped_copies(opt, params)))
    for name, c in copies.items():
        assert torch.equal(c.master, spawned[name].to(c.master.dtype)), name
    for name in ("experts.fc1_weight", "experts.fc2_weight"):
        assert copies[name].state  # Adam's moments: the base expert's, in every expert
        for value in copies[name].state.values():
            assert value[0].abs().sum() > 0 and all(torch.equal(value[e], value[0]) for e in range(1, E))
    # one more step moves the spawned weights a little; it does not bring the old ones back
    opt.zero_grad()
    opt.backward(layer(torch.randn(8, M, device=dev, dtype=dtype)).pow(2).sum())
    opt.step()
    w = layer.experts.fc1_weight.detach().float()
    assert (w.abs() < 5e-3).float().mean() > 0.4  # the mask's zeros: one Adam step moves them by ~lr
    assert (w - spawned["experts.fc1_weight"].float()).abs().max() < 0.01
    assert (layer.gate.router.wg.weight.detach() - spawned["gate.router.wg.weight"]).float().abs().max() < 0.01


@pytest.mark.parametrize("kind", ["flat", "per_param"])
@pytest.mark.parametrize("mode", ["copy", "mask"])
def test_a_half_precision_spawn_starts_from_the_fp32_master(kind, mode):
    """Under --bf16/--fp16 the experts are spawned from the base expert's fp32 master, not from its
    rounded model copy: `copy` leaves every master equal to the base's, `mask` keeps its values
    where it keeps them, and the model's experts are the masters rounded."""
    layer = diversify_layer().to(torch.bfloat16)
    layer.train()
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = fp16_optimizer(kind, params)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(layer(torch.randn(8, M, dtype=torch.bfloat16)).float().pow(2).sum())
        opt.step()
    names = [n for n, _ in layer.named_parameters()]
    masters = lambda: dict(zip(names, (c.master for c in stepped_copies(opt, params))))
    base = {n: masters()[n][0].clone() for n in ("experts.fc1_weight", "experts.fc2_weight")}
    assert not torch.equal(base["experts.fc1_weight"], layer.experts.fc1_weight[0].float())  # the master has more bits
    spawn(layer, SpawnSettings(mode, 0.5, seed=1))
    assert spawn_optimizer_state(layer, opt)
    for name, want in base.items():
        master, param = masters()[name], dict(layer.named_parameters())[name]
        assert torch.equal(param.detach(), master.to(torch.bfloat16))
        for e in range(E):
            kept = master[e] != 0
            assert torch.equal(master[e][kept], want[kept]) and (mode == "mask") == (kept.float().mean() < 0.7)


def test_a_plain_tasks_own_spawn_is_undone_by_fp32_master_copies():
    """Why the check below exists. Under a plain task the layer spawns on its own (set_num_updates),
    into the model's weights only; fairseq's FP16Optimizer (--bf16, --fp16: here per parameter)
    steps fp32 master copies still holding the base expert and writes them back into the model.
    (Here in bf16, which fairseq also runs on the CPU: of fp32 weights the masters would be the
    weights themselves.)"""
    layer = diversify_layer().to(torch.bfloat16)
    layer.plan = replace(layer.plan, updates=1)
    layer.train()
    base = layer.experts.fc1_weight[0].detach().float()
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = fp16_optimizer("per_param", params)
    layer.set_num_updates(1)  # what fairseq's task.train_step does first
    assert layer.is_spawned and (layer.experts.fc1_weight == 0).float().mean() > 0.4  # the mask's zeros
    opt.zero_grad()
    opt.backward(layer(torch.randn(8, M, dtype=torch.bfloat16)).float().pow(2).sum())
    opt.step()
    w = layer.experts.fc1_weight.detach().float()
    assert (w == 0).float().mean() < 0.01 and all((w[e] - base).abs().max() < 0.01 for e in range(E)), \
        "every expert is the base expert again"


def test_a_plain_task_refuses_to_train_half_precision_weights_towards_its_own_spawn():
    """The MoE models tell their EvoMoE layers the task's name when it is not an evomoe_* task; a
    training forward with fp16/bf16 weights then stops, before any update, with a message naming the
    options. fp32 training (the layers' own spawn stays), evaluation (generation loads EvoMoE
    checkpoints with plain tasks) and the evomoe_* tasks go on."""
    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    from fairseq_evomoe.evomoe.controller import diversifying_layers

    vocab = Dictionary()
    for i in range(40):
        vocab.add_symbol(f"w{i}")

    def build(evomoe_task: bool):
        class Task:
            source_dictionary = target_dictionary = vocab
            drives_evomoe_phases = evomoe_task  # what the evomoe_* tasks declare

        argv = ["/nonexistent", "--task", "language_modeling", "--arch", "transformer_lm_evomoe_tiny",
                "--criterion", "moe_cross_entropy", "--max-update", "100", "--fp16"]
        args = options.parse_args_and_arch(options.get_training_parser(), argv)
        torch.manual_seed(0)
        return ARCH_MODEL_REGISTRY[args.arch].build_model(args, Task())

    tokens = torch.randint(4, len(vocab), (2, 8))
    plain = build(evomoe_task=False)
    assert [m.plan.plain_task for m in diversifying_layers(plain)] == ["Task"]
    plain.train()(tokens)
    for dtype in (torch.float16, torch.bfloat16):
        model = build(evomoe_task=False).to(dtype)
        with pytest.raises(ValueError, match=r"--evomoe-diversify-updates \(10\) with --fp16/--bf16 needs an "
                           r"evomoe_\* task \(--task evomoe_translation, evomoe_language_modeling or evomoe_masked_lm\), "
                           r"not Task: .* fp32 master copies .* base expert"):
            model.train()(tokens)
        model.eval()(tokens)
    evomoe = build(evomoe_task=True).to(torch.bfloat16)
    assert [m.plan.plain_task for m in diversifying_layers(evomoe)] == [None]
    evomoe.train()(tokens)


def test_a_deep_copy_of_a_loaded_layer_sees_its_own_spawn():
    """A copy (copy.deepcopy, as fairseq's --ema makes) of a layer whose flag was read after a
    checkpoint load: spawning the copy makes it route, whatever version counters its buffers start at."""
    import copy

    layer = make_layer("dts", num_experts=4, diversify=True, dts_anneal_updates=10, evomoe_diversify_updates=0)
    layer.load_state_dict(layer.state_dict())  # an in-place write: the flag's buffer version moves
    assert not layer.is_spawned
    twin = copy.deepcopy(layer)
    twin.spawn()
    assert twin.is_spawned and twin.gate_routes and not layer.is_spawned
