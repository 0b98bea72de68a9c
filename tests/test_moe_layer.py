"""The MoE layer: fast index dispatch equals the dense reference; capacity, padding, balance loss."""

import pytest
import torch

from fairseq_evomoe.evomoe.schedule import Phase
from fairseq_evomoe.moe.dispatch import expert_capacity, plan_dispatch
from fairseq_evomoe.moe.gates.base import GATE_REGISTRY, switch_balance_loss

from moe_helpers import PAD, fast_and_reference, forward_recording_routing, make_layer, reference_layer_forward

# gates whose reference check runs on plain hidden states (every registered gate takes token ids too)
ALL_GATES = sorted(GATE_REGISTRY)


def token_ids_for(n, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g)


@pytest.mark.parametrize("gate", ALL_GATES)
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0])
def test_fast_path_equals_dense_reference(gate, capacity_factor):
    """The fast index dispatch equals layer.reference_forward on the same plan (what the CUDA tests
    reuse); which assignments the plan keeps is checked by test_layer_equals_independent_reference."""
    layer = make_layer(gate, capacity_factor=capacity_factor)
    layer.train()
    x = torch.randn(64, 16, requires_grad=True)
    ids = token_ids_for(64)
    fast, ref = fast_and_reference(layer, x, ids)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)

    # gradients w.r.t. the input and every parameter agree too
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), [x] + list(layer.parameters()), allow_unused=True)
    fast2, ref2 = fast_and_reference(layer, x, ids)
    grads_ref = torch.autograd.grad((ref2 * g).sum(), [x] + list(layer.parameters()), allow_unused=True)
    params = [x] + list(layer.parameters())
    for p, a, b in zip(params, grads_fast, grads_ref):
        a = torch.zeros_like(p) if a is None else a  # an expert that got no token has no gradient
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# Gate configurations for the independent reference: every registered gate, the top-2 second-expert
# policies, the DTS gate in its soft (never drops) and hard (top-1 with capacity) phases, StableMoE
# in both stages. `droppable`: whether the routing may drop under capacity.
REFERENCE_CASES = {
    "top1": dict(gate="top1", droppable=True),
    "top2-all": dict(gate="top2", moe_second_expert_policy="all", droppable=True),
    "top2-random": dict(gate="top2", moe_second_expert_policy="random", droppable=True),
    "top2-sampling": dict(gate="top2", moe_second_expert_policy="sampling", droppable=True),
    "dts-soft": dict(gate="dts", dts_anneal_updates=100, evomoe_diversify_updates=0, num_updates=50, droppable=False),
    "dts-hard": dict(gate="dts", dts_anneal_updates=100, evomoe_diversify_updates=0, dts_hard_update=10,
                     num_updates=10, droppable=True),
    "hash": dict(gate="hash", droppable=True),  # every priority is 1: ties keep the assignment order
    "stablemoe": dict(gate="stablemoe", droppable=True),
    "stablemoe-stage2": dict(gate="stablemoe", stablemoe_stage2_update=5, num_updates=5, droppable=True),
    "base": dict(gate="base", droppable=True),
    "dense_moe": dict(gate="dense_moe", droppable=False),
}


def test_reference_cases_cover_every_gate():
    assert {c["gate"] for c in REFERENCE_CASES.values()} == set(GATE_REGISTRY)


def padded_batch(T=11, B=4, M=16, seed=0):
    """x [T, B, M] (requires grad) and token ids [B, T] with right and left padding; the padded
    positions hold large values, which would show if they were routed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, T), generator=g)
    ids[0, 7:] = PAD
    ids[1, :2] = PAD  # left padding (fairseq's default for sources)
    ids[2, 3:] = PAD
    x = torch.randn(T, B, M, generator=g)
    x[ids.t().eq(PAD)] *= 100
    return x.requires_grad_(True), ids


def check_against_reference(layer, x, ids, seed=0, expect_drops=None):
    """MoELayer.forward equals the independent reference (moe_helpers) on the routing its own gate
    produced: outputs, dispatch counts, and gradients w.r.t. the input and every parameter."""
    out, (gate_x, gate_ids), routing = forward_recording_routing(layer, x, ids, seed)
    ref, x_real, ids_real, kept, capacity = reference_layer_forward(layer, x, ids, routing)

    # the gate saw exactly the non-padding tokens, in order
    torch.testing.assert_close(gate_x, x_real, rtol=0, atol=0)
    assert gate_ids is not None and torch.equal(gate_ids, ids_real)
    P = routing.expert_idx.numel() if routing.valid is None else int(routing.valid.sum())  # valid assignments
    if expect_drops is not None:
        assert (len(kept) < P) == expect_drops, (len(kept), P, capacity)

    pad = ids.t().eq(PAD)
    assert torch.all(out.detach()[pad] == 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    kept_per_expert = torch.bincount(routing.expert_idx[kept], minlength=layer.num_experts).float()
    torch.testing.assert_close(layer.metadata["tokens_per_expert"], kept_per_expert)
    assert layer.metadata["dropped_frac"].item() == pytest.approx(1 - len(kept) / max(P, 1))

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad((out * g).sum(), params, allow_unused=True, retain_graph=True)
    grads_ref = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, p, a, b in zip(names, params, grads, grads_ref):
        a = torch.zeros_like(p) if a is None else a  # a parameter outside the output's graph
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("drop_policy", ["score", "position"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_layer_equals_independent_reference(case, capacity_factor, drop_policy):
    """MoELayer.forward ([T, B, M] with padding) against a reference that decides by itself which
    assignments capacity keeps; heavy drops (0.5), some (1.0) and none (0 = dropless)."""
    opts = dict(REFERENCE_CASES[case])
    gate, droppable, num_updates = opts.pop("gate"), opts.pop("droppable"), opts.pop("num_updates", None)
    layer = make_layer(gate, capacity_factor=capacity_factor, drop_policy=drop_policy, **opts)
    layer.train()
    if num_updates is not None:
        layer.gate.set_num_updates(num_updates)
    if case.startswith("dts"):
        assert layer.gate.phase == (Phase.HARD if droppable else Phase.SOFT)
    if not droppable or capacity_factor == 0:
        expect_drops = False
    else:  # 0.5 always overflows an expert; 1.0 may or may not
        expect_drops = True if capacity_factor == 0.5 else None
    x, ids = padded_batch()
    check_against_reference(layer, x, ids, expect_drops=expect_drops)


@pytest.mark.parametrize("gate", ["top1", "top2", "base"])
@pytest.mark.parametrize("drop_policy", ["score", "position"])
def test_evaluation_uses_the_eval_capacity_factor(gate, drop_policy):
    layer = make_layer(gate, capacity_factor=0.0, eval_capacity_factor=0.5, drop_policy=drop_policy)
    layer.eval()
    x, ids = padded_batch(seed=2)
    check_against_reference(layer, x, ids, expect_drops=True)
    layer.train()  # the training factor (0) is dropless
    check_against_reference(layer, x, ids, expect_drops=False)


@pytest.mark.parametrize("gate", ALL_GATES)
def test_padding_is_never_routed(gate):
    layer = make_layer(gate, capacity_factor=1.0)
    layer.eval()
    T, B, M = 7, 3, 16
    x = torch.randn(T, B, M)
    ids = token_ids_for(T * B).view(B, T)
    ids[0, 5:] = PAD
    ids[2, 2:] = PAD
    out = layer(x, ids)
    pad = ids.eq(PAD).t()  # [T, B]
    assert torch.all(out[pad] == 0), "padding positions must get no expert output"
    n_real = int((~pad).sum())
    assert layer.metadata["num_tokens"].item() == n_real
    # padding content does not change the outputs of real tokens
    x2 = x.clone()
    x2[pad] = torch.randn(int(pad.sum()), M) * 100
    torch.testing.assert_close(layer(x2, ids)[~pad], out[~pad])


@pytest.mark.parametrize("path", ["batched", "grouped_mm"])
@pytest.mark.parametrize("phase", ["sparse", "diversify"])
@pytest.mark.parametrize("gate", ["top1", "top2", "dts"])
def test_autocast_with_padding(gate, phase, path, monkeypatch):
    """--amp runs the model under autocast: on a GPU the experts' matmuls return fp16 for fp32
    hidden states (here: CPU autocast to bf16 through the GPU's two expert paths, the batched
    matmul and grouped_mm, which has no autocast rule and is cast by the layer). The layer's output
    takes the experts' dtype, as a dense FFN's would; combining into an fp32 buffer used to fail
    ("index_copy_(): self and source expected to have the same dtype") on every batch with padding."""
    import fairseq_evomoe.moe.experts as experts_module

    if path == "batched":
        monkeypatch.setattr(experts_module, "grouped_mm_preferred", lambda x, num_experts: False)
    layer = make_layer(gate, capacity_factor=1.0, diversify=phase == "diversify").train()
    layer.experts.activation_dropout = 0.1  # (the CPU's own group path has no dropout, so the GPU's paths run)
    T, B, M = 6, 2, 16
    x = torch.randn(T, B, M, requires_grad=True)
    ids = token_ids_for(T * B).view(B, T)
    ids[1, 4:] = PAD
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, ids)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.all(out[ids.eq(PAD).t()] == 0)
    out.float().sum().backward()
    assert x.grad is not None and layer.experts.fc1_weight.grad is not None


@pytest.mark.parametrize("gate", ALL_GATES)
def test_router_math_stays_fp32_under_autocast(gate):
    """Autocast (--amp) would run the router's linear layers in fp16/bf16; routing decisions and
    weights must come from fp32 logits, the same as without autocast."""
    layer = make_layer(gate, capacity_factor=1.0).train()
    x, ids = torch.randn(40, 16), token_ids_for(40)
    torch.manual_seed(1)
    plain = layer.gate(x, ids)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer.gate(x, ids)
    assert mixed.weight.dtype == torch.float32
    for name in ("token_idx", "expert_idx", "weight", "probs", "balance_loss", "z_loss"):
        a, b = getattr(plain, name), getattr(mixed, name)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_experts_in_their_own_compute_dtype(autocast):
    """--moe-expert-dtype bf16: the experts compute in bf16 and return the dtype they would have
    returned otherwise (the model's; autocast's under --amp); gradients reach the weights in
    their own dtype. Forward and gradients stay within bf16 rounding of the fp32 experts."""
    from fairseq_evomoe.moe.experts import ExpertFFNs

    torch.manual_seed(0)
    plain = ExpertFFNs(4, 16, 32, torch.nn.functional.gelu)
    bf16 = ExpertFFNs(4, 16, 32, torch.nn.functional.gelu, compute_dtype=torch.bfloat16)
    bf16.load_state_dict(plain.state_dict())
    x = torch.randn(20, 16)
    counts = [6, 0, 9, 5]
    outs, grads = {}, {}
    for name, m in (("plain", plain), ("bf16", bf16)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            y, y0 = m(xi, counts), m.forward_one(xi, 2)
        outs[name] = (y, y0)
        (y.float().square().sum() + y0.float().sum()).backward()
        grads[name] = [xi.grad] + [p.grad for p in m.parameters()]
    want = torch.float16 if autocast else torch.float32
    assert all(t.dtype == want for t in outs["bf16"])
    assert all(g.dtype == torch.float32 for g in grads["bf16"])
    for a, b in zip(outs["bf16"], outs["plain"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    for a, b in zip(grads["bf16"], grads["plain"]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


def test_phase_flag_follows_the_spawned_buffer():
    """is_spawned caches the `spawned` buffer (reading it on a GPU waits for the GPU); every way
    the buffer changes is seen."""
    import copy
    import pickle

    layer = make_layer("top1", diversify=True)
    assert not layer.is_spawned and not layer.gate_routes
    layer.spawned.fill_(True)
    assert layer.is_spawned and layer.gate_routes
    layer.load_state_dict({**layer.state_dict(), "spawned": torch.tensor(False)})
    assert not layer.is_spawned
    layer.spawned = torch.tensor(True)
    assert layer.is_spawned
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.is_spawned
        clone.spawned.fill_(False)
        assert not clone.is_spawned and layer.is_spawned


def test_capacity_drops_lowest_scores_and_keeps_counts():
    layer = make_layer("top1", capacity_factor=0.5)
    layer.train()
    x = torch.randn(40, 16)
    routing = layer.gate(x, None)
    cap = layer.capacity(40, 1)
    assert cap == expert_capacity(40, 4, 0.5) == 5
    plan = plan_dispatch(routing, 4, cap, "score")
    assert int(plan.counts.max()) <= cap
    assert torch.equal(plan.counts, plan.routed_counts.clamp(max=cap))
    # within each expert the kept assignments are the highest-priority ones
    kept = set(plan.kept().tolist())
    for e in range(4):
        mine = (routing.expert_idx == e).nonzero().squeeze(1)
        if len(mine) <= cap:
            continue
        kept_scores = routing.priority[[i for i in mine.tolist() if i in kept]]
        dropped_scores = routing.priority[[i for i in mine.tolist() if i not in kept]]
        assert kept_scores.min() >= dropped_scores.max()


def test_position_policy_keeps_earliest_tokens():
    layer = make_layer("top1", capacity_factor=0.5, drop_policy="position")
    x = torch.randn(40, 16)
    routing = layer.gate(x, None)
    plan = plan_dispatch(routing, 4, 5, "position")
    kept = set(plan.kept().tolist())
    for e in range(4):
        mine = (routing.expert_idx == e).nonzero().squeeze(1).tolist()
        assert [i for i in mine if i in kept] == mine[:5]


def test_top2_serves_first_choices_before_second_choices():
    layer = make_layer("top2", capacity_factor=0.5, moe_second_expert_policy="all")
    layer.train()
    x = torch.randn(64, 16)
    routing = layer.gate(x, None)
    plan = plan_dispatch(routing, 4, layer.capacity(64, 2), "score")
    kept = torch.zeros(routing.expert_idx.numel(), dtype=torch.bool)
    kept[plan.kept()] = True
    for e in range(4):
        mine = routing.expert_idx == e
        if kept[mine & (routing.rank == 1)].any():
            assert kept[mine & (routing.rank == 0)].all(), "a second choice was kept while a first choice was dropped"


def test_dropped_tokens_pass_through_as_zero():
    layer = make_layer("top1", capacity_factor=0.1)
    layer.train()
    x = torch.randn(50, 16)
    out = layer.forward_tokens(x, None)
    routing = layer.gate(x, None)
    plan = plan_dispatch(routing, 4, layer.capacity(50, 1), "score")
    dropped = torch.ones(50, dtype=torch.bool)
    dropped[routing.token_idx[plan.kept()]] = False
    assert dropped.any()
    assert torch.all(out[dropped] == 0)
    assert layer.metadata["dropped_frac"].item() == pytest.approx(dropped.float().mean().item())


def test_uniform_router_gives_balance_loss_one():
    S, E = 64, 8
    probs = torch.full((S, E), 1.0 / E)
    choice = torch.arange(S) % E
    assert switch_balance_loss(probs, choice, E).item() == pytest.approx(1.0)
    # with a zero router every gate of the top-k family is uniform as well
    layer = make_layer("top1", num_experts=E)
    torch.nn.init.zeros_(layer.gate.router.wg.weight)
    x = torch.randn(S, 16)
    loss = layer.gate(x, None).balance_loss
    assert loss.item() == pytest.approx(1.0)


def test_balance_loss_ignores_padding():
    layer = make_layer("top1")
    layer.train()
    T, B = 6, 4
    x = torch.randn(T, B, 16)
    ids = token_ids_for(T * B).view(B, T)
    layer(x, ids)
    loss_no_pad = layer.metadata["balance_loss"].item()
    # add padded columns with arbitrary hidden states: the loss must not move
    ids_padded = torch.cat([ids, torch.full((B, 3), PAD)], dim=1)
    x_padded = torch.cat([x, torch.randn(3, B, 16) * 10], dim=0)
    layer(x_padded, ids_padded)
    assert layer.metadata["balance_loss"].item() == pytest.approx(loss_no_pad, rel=1e-6)


def test_non_finite_inputs_do_not_break_routing():
    layer = make_layer("top1")
    x = torch.randn(10, 16)
    x[3, 0] = float("inf")
    x[4, 1] = float("nan")
    routing = layer.gate(x, None)
    assert torch.isfinite(routing.weight).all()
    assert ((routing.expert_idx >= 0) & (routing.expert_idx < 4)).all()


def test_expert_capacity_formula():
    assert expert_capacity(100, 4, 0.0) is None
    assert expert_capacity(100, 4, 1.0) == 25
    assert expert_capacity(100, 4, 1.25, k=2) == 63
    assert expert_capacity(200, 4, 1.1) == 55  # 1.1 * 200 / 4 is 55.000000000000014 in floats
    assert expert_capacity(360, 4, 1.1) == 99
    with pytest.raises(ValueError, match="capacity factor"):
        expert_capacity(100, 4, -1.0)


def test_stats_are_reported():
    layer = make_layer("top2", capacity_factor=1.0)
    layer.train()
    layer(torch.randn(5, 4, 16), token_ids_for(20).view(4, 5))
    md = layer.metadata
    for key in ("balance_loss", "z_loss", "tokens_per_expert", "dropped_frac", "experts_per_token", "router_entropy"):
        assert key in md
    assert md["tokens_per_expert"].shape == (4,)
    assert 1.0 <= md["experts_per_token"].item() <= 2.0
    assert 0 < md["router_entropy"].item() <= torch.log(torch.tensor(4.0)).item() + 1e-6


@pytest.mark.parametrize("gate", ["top1", "top2"])
def test_token_level_drop_statistics(gate):
    """dropped_frac counts assignments; tokens_unserved counts tokens that kept no expert at all
    (with top-2 a token that lost only its second expert is still served)."""
    layer = make_layer(gate, capacity_factor=0.3)
    layer.train()
    x = torch.randn(60, 16)
    torch.manual_seed(1)
    layer.forward_tokens(x, None)
    torch.manual_seed(1)
    routing = layer.gate(x, None)
    plan = plan_dispatch(routing, 4, layer.capacity(60, routing.capacity_k), "score")
    kept_per_token = torch.zeros(60).index_add_(0, routing.token_idx[plan.kept()], torch.ones(plan.kept().numel()))
    md = layer.metadata
    assert md["tokens_unserved"].item() == (kept_per_token == 0).sum().item() > 0
    assert md["dropped_frac"].item() == pytest.approx(1 - plan.kept().numel() / routing.token_idx.numel())
    if gate == "top2":  # some tokens lost one of their two experts only: fewer tokens than assignments
        assert (kept_per_token == 1).sum() > 0
        assert md["tokens_unserved"].item() < routing.token_idx.numel() - plan.kept().numel()


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_expert_group_paths_agree(activation):
    """The CPU per-group FFN (custom backward), torch's grouped_mm and the batched matmul (with a
    capacity bound, and dropless with the bound read from the counts) give the same outputs and
    gradients as a per-expert loop, with experts that get no rows."""
    import torch.nn.functional as F

    from fairseq_evomoe.moe.experts import ExpertFFNs
    from fairseq_evomoe.moe.expert_grouped_mm import grouped_mm_supported

    torch.manual_seed(0)
    experts = ExpertFFNs(5, 16, 32, getattr(F, activation))
    counts = [3, 0, 7, 1, 4]
    x = torch.randn(sum(counts), 16)
    g = torch.randn(sum(counts), 16)

    def run(fn):
        xi = x.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        y = fn(xi)
        (y * g).sum().backward()
        return [y.detach(), xi.grad] + [p.grad.clone() for p in experts.parameters()]

    def loop(xi):
        return torch.cat([experts.forward_one(xe, e) for e, xe in enumerate(xi.split(counts))])

    want = run(loop)
    paths = {"groups": lambda xi: experts(xi, counts), "groups, counts as a tensor": lambda xi: experts(xi, torch.tensor(counts)),
             "batched, capacity 9": lambda xi: experts(xi, torch.tensor(counts), max_rows=9),
             "batched, dropless": lambda xi: experts(xi, torch.tensor(counts))}
    if grouped_mm_supported(x):
        paths["grouped_mm"] = lambda xi: experts.grouped_forward(xi, counts)
        paths["grouped_mm, counts as a tensor"] = lambda xi: experts.grouped_forward(xi, torch.tensor(counts))
    for name, fn in paths.items():
        experts.static_shapes, experts.static_path = (True, "batched") if name.startswith("batched") else (None, None)
        for a, b in zip(run(fn), want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    if grouped_mm_supported(x):  # a broadcast output gradient, as y.sum() gives
        xi = x.clone().requires_grad_(True)
        experts.grouped_forward(xi, counts).sum().backward()
        assert xi.grad.shape == x.shape
    assert want[3][1].abs().sum() == 0  # fc1_bias of the expert without rows: zero gradient


def test_expert_weight_gradients_reuse_memory_only_when_free():
    """The CPU experts hand out the same weight-gradient memory again once nothing holds it (fairseq's
    zero_grad frees p.grad every step); a gradient someone still holds is never overwritten, and
    gradient accumulation still sums."""
    import copy

    import torch.nn.functional as F

    from fairseq_evomoe.moe.experts import ExpertFFNs

    torch.manual_seed(0)
    experts = ExpertFFNs(3, 8, 16, F.relu)
    counts = [2, 3, 1]
    xs = [torch.randn(sum(counts), 8) for _ in range(3)]

    def grads_of(x):  # the expected fc1/fc2 weight gradients of sum(experts(x)), from a fresh copy
        fresh = copy.deepcopy(experts)
        fresh.zero_grad(set_to_none=True)
        fresh(x, counts).sum().backward()
        return fresh.fc1_weight.grad.clone(), fresh.fc2_weight.grad.clone()

    def step(x):
        experts(x, counts).sum().backward()
        return experts.fc1_weight.grad, experts.fc2_weight.grad

    first = step(xs[0])
    first_ptrs = [g.data_ptr() for g in first]
    del first
    experts.zero_grad(set_to_none=True)
    second = step(xs[1])
    assert [g.data_ptr() for g in second] == first_ptrs  # freed by zero_grad, so reused
    assert second[0].data_ptr() == experts.grad_storage._kept["fc1_weight"].data_ptr()
    for got, want in zip(second, grads_of(xs[1])):
        torch.testing.assert_close(got, want)

    held = [g.clone() for g in second]  # the caller keeps the gradients of step 2 ...
    kept = list(second)
    experts.zero_grad(set_to_none=True)
    third = step(xs[2])
    assert [g.data_ptr() for g in third] != first_ptrs  # ... so step 3 gets new memory
    for got, want in zip(kept, held):
        torch.testing.assert_close(got, want)  # and step 2's gradients are untouched
    for got, want in zip(third, grads_of(xs[2])):
        torch.testing.assert_close(got, want)

    # gradient accumulation: a second backward without zero_grad adds to p.grad
    summed = step(xs[0])
    for got, a, b in zip(summed, grads_of(xs[2]), grads_of(xs[0])):
        torch.testing.assert_close(got, a + b)
    assert not copy.deepcopy(experts).grad_storage._kept  # a copy of the module starts empty


def test_reused_gradients_of_experts_without_tokens_are_zero():
    """Reused gradient memory is rewritten whole, zero slots included: whatever held it as p.grad
    may have written into slots this step left at zero (a data-parallel all-reduce copies the other
    workers' gradients into them; a clip by a NaN norm makes them NaN). Whatever the sequence of
    empty experts and the writes between steps, every gradient equals that of a fresh module, and
    each step reuses the memory."""
    import copy

    import torch.nn.functional as F

    from fairseq_evomoe.moe.experts import ExpertFFNs

    torch.manual_seed(0)
    experts = ExpertFFNs(4, 8, 16, F.relu)
    reference = copy.deepcopy(experts)
    ptrs = set()
    between_steps = [lambda g: g.mul_(0.5), lambda g: g.add_(1.0), lambda g: g.mul_(float("nan"))]
    for i, counts in enumerate(([5, 0, 0, 0], [5, 0, 0, 0], [2, 3, 1, 4], [0, 3, 0, 2], [0, 3, 0, 2],
                                [6, 0, 0, 0], [6, 0, 0, 0])):
        x = torch.randn(sum(counts), 8)
        experts(x, counts).sum().backward()
        reference.zero_grad(set_to_none=True)
        reference.grad_storage = None  # fresh memory, every slot written
        reference(x, counts).sum().backward()
        for p, q in zip(experts.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        ptrs.add(experts.fc1_weight.grad.data_ptr())
        for p in experts.parameters():
            between_steps[i % 3](p.grad)  # clipping, an all-reduce's copy-back, a clip by a NaN norm
        experts.zero_grad(set_to_none=True)
    assert len(ptrs) == 1


def test_diversify_phase_runs_the_base_expert_through_the_expert_path():
    """Before the spawn the layer is expert 0 as a dense FFN: same output and gradients as
    forward_one, no gradient for the other experts."""
    layer = make_layer("top1", num_experts=4, dim=16, ffn=32, diversify=True)
    layer.train()
    x = torch.randn(7, 16, requires_grad=True)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = layer.experts.forward_one(ref_x, 0)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    grads = [p.grad.clone() for p in layer.experts.parameters()]
    layer.experts.zero_grad(set_to_none=True)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    for g, p in zip(grads, layer.experts.parameters()):
        torch.testing.assert_close(g, p.grad)
        assert torch.all(g[1:] == 0)
