"""The Dense-To-Sparse gate: dynamic experts per token, annealing, hard top-1, evaluation."""

import pytest
import torch

from fairseq_evomoe.evomoe.schedule import Phase

from moe_helpers import make_layer

import fairseq_evomoe  # noqa: F401,E402  (registers the gates)
from fairseq_evomoe.moe.gates.base import build_gate  # noqa: E402

from moe_helpers import moe_args  # noqa: E402
from fairseq_evomoe.moe.gates.top_k import gumbel_noise_like  # noqa: E402


def dts_layer(**kw):
    opts = dict(dts_anneal_updates=100, evomoe_diversify_updates=0)
    opts.update(kw)
    layer = make_layer("dts", num_experts=8, capacity_factor=1.0, **opts)
    layer.train()
    return layer


def experts_per_token(layer, x, updates):
    layer.gate.set_num_updates(updates)
    torch.manual_seed(0)
    layer(x)
    return layer.metadata["experts_per_token"].item()


def test_soft_phase_starts_dense_and_sparsifies_as_tau_falls():
    layer = dts_layer(dts_tau_min=0.05, dts_threshold=0.02)
    x = torch.randn(256, 16)
    counts = [experts_per_token(layer, x, t) for t in (0, 50, 99)]
    assert counts[0] > 7.0, counts  # nearly every expert at tau = 2
    assert counts[0] > counts[1] > counts[2], counts
    assert layer.gate.phase == Phase.SOFT
    assert experts_per_token(layer, x, 100) == 1.0  # hard switch at the end of annealing
    assert layer.gate.phase == Phase.HARD


def test_soft_phase_drops_nothing_and_computes_only_selected_pairs():
    layer = dts_layer(dts_tau_min=0.05)
    layer.gate.set_num_updates(99)
    x = torch.randn(64, 16)
    torch.manual_seed(3)
    routing = layer.gate(x, None)
    assert not routing.droppable
    assert routing.token_idx.numel() < 64 * 8  # sparse assignment list, not every pair
    torch.manual_seed(3)
    layer(x)
    assert layer.metadata["dropped_frac"].item() == 0.0
    assert layer.metadata["tokens_per_expert"].sum().item() == routing.token_idx.numel()


def dts_gate(num_experts=8, updates=50, seed=0, **kw):
    """A DTS gate in training mode, its router drawn from `seed` (the same for every call), the
    schedule from update 0: tau 2 -> 0.5 over 100 updates, at `updates` (50: tau = 1.25, soft)."""
    opts = dict(dts_anneal_updates=100, evomoe_diversify_updates=0)
    opts.update(kw)
    torch.manual_seed(seed)
    gate = build_gate("dts", 16, num_experts, moe_args(moe_gate="dts", moe_expert_count=num_experts, **opts))
    gate.train()
    gate.set_num_updates(updates)
    return gate


def route(gate, x, seed):
    """The gate's routing of x under `seed`, and the Gumbel-softmax weights y = softmax((l + g) / tau)
    it drew them from, recomputed here: the logits l = W_g x and the Gumbel noise g = -log(-log u),
    u ~ U(0, 1) per token and expert, the first draw after the seed."""
    torch.manual_seed(seed)
    r = gate(x, None)
    with torch.no_grad():
        logits = x.float() @ gate.router.wg.weight.t().float()
        torch.manual_seed(seed)
        u = torch.rand(logits.shape).clamp_(min=1e-9, max=1.0 - 1e-7)
        y = ((logits - torch.log(-torch.log(u))) / gate.tau).softmax(dim=-1)
    return r, logits, y


def selection(r, num_tokens, num_experts):
    chosen = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    chosen[r.token_idx, r.expert_idx] = True
    return chosen


def test_threshold_decides_the_selection():
    """The same logits and noise (same router, same seed) with three --dts-threshold values: a
    token goes to exactly the experts whose Gumbel-softmax weight y_e exceeds the threshold, plus
    its argmax (always kept), so a smaller threshold gives more experts per token."""
    S, E = 200, 8
    x = torch.randn(S, 16, generator=torch.Generator().manual_seed(0))
    per_token = []
    for threshold in (0.02, 0.1, 0.3):
        gate = dts_gate(dts_threshold=threshold, dts_combine_weights="gumbel")
        r, _, y = route(gate, x, seed=5)
        chosen = selection(r, S, E)
        top = torch.nn.functional.one_hot(y.argmax(-1), E).bool()
        # the gumbel combine weights are the y of the selected experts: the recomputed y is the gate's
        torch.testing.assert_close(r.weight, y[r.token_idx, r.expert_idx])
        assert (chosen & top).sum() == S  # every token keeps its argmax
        assert (y[chosen & ~top] > threshold).all()  # every other selected expert is above the threshold
        assert (y[~chosen] <= threshold).all()  # every unselected one at or below it
        assert torch.equal(chosen, (y > threshold) | top)
        per_token.append(chosen.sum().item() / S)
        if threshold == 0.3:  # tokens whose largest y is below the threshold still get their argmax
            assert (y.max(-1).values <= threshold).any()
    assert per_token[0] > per_token[1] > per_token[2] >= 1.0, per_token
    assert per_token[0] > 6 and per_token[2] < 1.5, per_token


def test_max_experts_caps_the_selection_and_weights_default_to_softmax():
    S, E = 100, 8
    x = torch.randn(S, 16, generator=torch.Generator().manual_seed(1))
    gate = dts_gate(dts_threshold=0.02, dts_max_experts=2)
    r, logits, y = route(gate, x, seed=1)
    chosen = selection(r, S, E)
    per_token = chosen.sum(-1)
    assert per_token.min() >= 1 and per_token.max() <= 2
    assert (per_token == 2).any()  # the cap is reached, so it is what limits the selection
    top2 = torch.zeros(S, E, dtype=torch.bool).scatter_(1, y.topk(2, dim=-1).indices, True)
    torch.testing.assert_close(chosen, ((y > 0.02) | torch.nn.functional.one_hot(y.argmax(-1), E).bool()) & top2)
    torch.testing.assert_close(r.weight, logits.softmax(-1)[r.token_idx, r.expert_idx])  # default: softmax weights


def test_renormalised_gumbel_weights_sum_to_one():
    layer = dts_layer(dts_combine_weights="gumbel", dts_renormalize=True)
    x = torch.randn(50, 16)
    r = layer.gate(x, None)
    sums = torch.zeros(50).index_add(0, r.token_idx, r.weight)
    torch.testing.assert_close(sums, torch.ones(50))


def test_evaluation_is_deterministic_top1_without_drops():
    layer = dts_layer()
    layer.eval()
    x = torch.randn(40, 16)
    torch.manual_seed(0)
    a = layer.gate(x, None)
    torch.manual_seed(123)
    b = layer.gate(x, None)
    assert torch.equal(a.expert_idx, b.expert_idx)
    assert torch.equal(a.expert_idx, a.probs.argmax(-1))
    assert not a.droppable and a.token_idx.numel() == 40


def test_hard_phase_uses_gumbel_max_and_capacity():
    """Hard phase, training, --dts-hard-routing sample (the authors'; the default is argmax(l), as
    evaluation): top-1 by a Gumbel-max *sample* argmax(l + g), so with fixed logits where
    expert 0 dominates (p = softmax(l) = 0.71, 0.10, 0.10, 0.10), the other experts are still chosen,
    at the frequencies p (an argmax(l) routing would send every token to expert 0). Evaluation
    routes every token to argmax(l). Weights are p of the chosen expert; capacity may drop."""
    S, E = 20000, 4
    gate = dts_gate(num_experts=E, updates=10, dts_hard_update=10, dts_hard_routing="sample")
    assert gate.phase == Phase.HARD
    with torch.no_grad():
        gate.router.wg.weight.zero_()
        gate.router.wg.weight[0, 0] = 2.0  # l = (2, 0, 0, 0) for x = e_0
    x = torch.zeros(S, 16)
    x[:, 0] = 1.0
    p = torch.tensor([2.0, 0.0, 0.0, 0.0]).softmax(-1)

    torch.manual_seed(0)
    r = gate(x, None)
    assert r.droppable and r.token_idx.numel() == S and torch.equal(r.token_idx, torch.arange(S))
    torch.testing.assert_close(r.weight, p[r.expert_idx])
    share = torch.bincount(r.expert_idx, minlength=E).float() / S
    torch.testing.assert_close(share, p, atol=0.015, rtol=0)  # ~5 standard deviations at S = 20000
    assert (share[1:] > 0.07).all()  # not argmax(l): every expert gets tokens

    gate.eval()
    torch.manual_seed(0)
    r = gate(x, None)
    assert not r.droppable and (r.expert_idx == 0).all()
    torch.testing.assert_close(r.weight, p[0].expand(S))


def test_balance_loss_matches_the_formula():
    """E * sum_e me_e * ce_e (me_e: mean softmax weight of e where selected, 0 elsewhere; ce_e: share of
    tokens selecting e), recomputed from the logits and the Gumbel noise, where it varies: at a low
    temperature most tokens select one or two experts (at tau = 2 every token selects every expert
    and the loss is the constant E)."""
    S, E = 300, 8
    x = torch.randn(S, 16, generator=torch.Generator().manual_seed(2))
    losses = []
    for updates in (80, 99):  # tau = 0.44, 0.07
        gate = dts_gate(updates=updates, dts_threshold=0.05, dts_tau_min=0.05)
        r, logits, y = route(gate, x, seed=3)
        selected = (y > 0.05) | torch.nn.functional.one_hot(y.argmax(-1), E).bool()
        assert torch.equal(selection(r, S, E), selected)
        assert selected.sum() < 0.35 * S * E  # sparse: the loss is not the dense constant
        combine = logits.softmax(-1) * selected
        expected = E * (combine.mean(0) * selected.float().mean(0)).sum()
        assert r.balance_loss.item() == pytest.approx(expected.item(), rel=1e-5)
        losses.append(r.balance_loss.item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-3) and all(l < E - 0.5 for l in losses), losses


@pytest.mark.parametrize("updates", [10, 99], ids=["soft", "hard"])
def test_balance_loss_is_one_when_uniform_and_larger_when_skewed(updates):
    """Routers so sharp that each token gets exactly one expert with weight ~1 (in the soft phase too:
    the other y are below 1e-6): spread evenly over the experts the loss is 1; all on one expert it
    is E; half on one expert, the rest even, E * sum_e f_e^2 in between."""
    S, E = 64, 8
    gate = dts_gate(num_experts=E, updates=updates, dts_hard_update=99)
    assert gate.phase == (Phase.HARD if updates == 99 else Phase.SOFT)
    with torch.no_grad():
        gate.router.wg.weight.copy_(50.0 * torch.eye(E, 16))  # l = 50 * onehot(expert of x)

    def loss(experts):
        torch.manual_seed(0)
        r = gate(torch.nn.functional.one_hot(experts, 16).float(), None)
        assert torch.equal(r.expert_idx, experts) and torch.equal(r.token_idx, torch.arange(S))
        return r.balance_loss.item()

    even = torch.arange(S) % E
    half = torch.where(torch.arange(S) < S // 2, torch.zeros(S, dtype=torch.long), torch.arange(S) % E)
    share = torch.bincount(half, minlength=E).float() / S
    assert loss(even) == pytest.approx(1.0, rel=1e-5)
    assert loss(half) == pytest.approx(E * (share ** 2).sum().item(), rel=1e-5)
    assert 1.5 < loss(half) < E - 1
    assert loss(torch.zeros(S, dtype=torch.long)) == pytest.approx(float(E), rel=1e-5)


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="--dts-combine-weights 'max' is not valid; choose one of: softmax, gumbel"):
        dts_layer(dts_combine_weights="max")
    with pytest.raises(ValueError, match="--dts-max-experts"):
        dts_layer(dts_max_experts=-1)
    with pytest.raises(ValueError, match="--dts-sparsity 'quantile' is not valid; choose one of: threshold, scheduled"):
        dts_layer(dts_sparsity="quantile")
    with pytest.raises(ValueError, match=r"--dts-k-start must be between 1 and --moe-expert-count \(8\)"):
        dts_layer(dts_sparsity="scheduled", dts_k_start=9)


@pytest.mark.parametrize("num_experts", [4, 8, 16, 64])
@pytest.mark.parametrize("logit_scale", [0.01, 1.0, 30.0])
def test_scheduled_sparsity_gives_k_experts_per_token_whatever_the_logit_scale(num_experts, logit_scale):
    """--dts-sparsity scheduled: a batch of S tokens keeps round(k(t) * S) assignments, k(t) going
    from E at the spawn to 1 after D updates; every token keeps its largest Gumbel-softmax weight and
    the others are the batch's largest."""
    from fairseq_evomoe.evomoe.dts_gate import scheduled_selection

    layer = make_layer("dts", num_experts=num_experts, dim=16, ffn=8, dts_sparsity="scheduled", dts_anneal_updates=100).train()
    with torch.no_grad():
        layer.gate.router.wg.weight.mul_(logit_scale)
    g = torch.Generator().manual_seed(num_experts)
    for t in (0, 30, 60, 99, 100):
        layer.gate.set_num_updates(t)
        k = num_experts - (num_experts - 1) * min(t / 100, 1.0)
        assert layer.gate.target_experts == pytest.approx(k)
        x = torch.randn(301, 16, generator=g)
        layer(x)
        assert layer.metadata["experts_per_token"].item() == pytest.approx(round(k * 301) / 301, rel=1e-6), t
    y = torch.rand(50, num_experts, generator=g).softmax(-1)
    sel = scheduled_selection(y, 2.5)
    assert int(sel.sum()) == 125 and bool(sel.any(-1).all())
    assert bool(sel.gather(1, y.argmax(-1, keepdim=True)).all())
    others = y.masked_fill(torch.zeros_like(sel).scatter_(1, y.argmax(-1, keepdim=True), True), -1.0)
    assert others[sel & (others >= 0)].min() >= others[~sel].max()  # the batch's largest remaining weights


def test_resumed_run_keeps_the_saved_schedule_whatever_its_max_update():
    """Phase lengths given as fractions of --max-update (the *_evomoe* defaults) must not move when
    a run is resumed with a larger --max-update: the checkpoint's T_div, D and H are kept."""
    from fairseq_evomoe.evomoe.expert_diversify import DiversifyPlan
    from fairseq_evomoe.evomoe.spawn import SpawnSettings

    def layer(max_update):
        fractions = dict(max_update=max_update, evomoe_diversify_updates=0.1, dts_anneal_updates=0.5)
        plan = DiversifyPlan(int(0.1 * max_update), SpawnSettings("mask", 0.5, seed=1))
        return make_layer("dts", num_experts=8, capacity_factor=1.0, diversify=plan, **fractions)

    trained, resumed = layer(10000), layer(20000)
    assert resumed.gate.schedule != trained.gate.schedule
    resumed.load_state_dict(trained.state_dict())
    assert resumed.plan.updates == 1000
    for n in (999, 1500, 5999, 6000, 6500, 10000, 15000):
        for m in (trained, resumed):
            m.gate.set_num_updates(n)
        assert (resumed.gate.phase, resumed.gate.tau) == (trained.gate.phase, trained.gate.tau), n
    # a checkpoint from before the counts were saved loads, with this run's schedule
    old = {k: v for k, v in trained.state_dict().items() if k not in ("spawn_update", "gate.schedule_updates")}
    fresh = layer(20000)
    fresh.load_state_dict(old)
    assert fresh.plan.updates == 2000 and fresh.gate.schedule.diversify_updates == 2000


@pytest.mark.parametrize("hard_routing", ["sample", "argmax"])
@pytest.mark.parametrize("sparsity", ["threshold", "scheduled"])
def test_hard_phase_counts_the_tokens_the_switch_changes(sparsity, hard_routing):
    """In the hard phase the gate reports how many tokens the soft rule, at the same noise, would
    not give exactly their one expert: more experts, or another one (argmax(l + g) where the hard
    phase routes by argmax(l)). With scheduled sparsity k(t) is 1 by then, so the switch changes no
    token when both rules take the noisy choice, and the noise's other choices under argmax."""
    layer = dts_layer(dts_sparsity=sparsity, dts_hard_update=100, dts_hard_routing=hard_routing)
    layer.gate.set_num_updates(100)
    x = torch.randn(64, 16)
    torch.manual_seed(3)
    routing = layer.gate(x)
    torch.manual_seed(3)
    logits = layer.gate.router(x).detach()
    noisy = logits + gumbel_noise_like(logits)
    soft = layer.gate.soft_selection((noisy / layer.gate.tau).softmax(-1))
    many = soft.sum(-1) > 1
    moved = noisy.argmax(-1) != logits.argmax(-1)
    changed = many | moved if hard_routing == "argmax" else many
    assert int(routing.token_counts["switch_changed"]) == int(changed.sum())
    assert (int(many.sum()) == 0) if sparsity == "scheduled" else (int(many.sum()) > 0)
    assert int(moved.sum()) > 0


def test_a_loaded_gate_never_goes_back_to_an_earlier_phase():
    """Fine-tuning that restarts the update counter (--reset-optimizer, --finetune-from-model) keeps
    the routing the checkpoint had reached: top-1 stays top-1 and tau never rises again; an
    unfinished schedule continues from where it was. --moe-rerun-schedules follows the counter."""
    trained = dts_layer(dts_hard_update=100)
    trained.gate.set_num_updates(150)
    assert trained.gate.phase == Phase.HARD and int(trained.gate.schedule_position) == 150
    for rerun, phase in ((False, Phase.HARD), (True, Phase.SOFT)):
        tuned = dts_layer(dts_hard_update=100, moe_rerun_schedules=rerun)
        tuned.load_state_dict(trained.state_dict())
        tuned.gate.set_num_updates(0)
        assert tuned.gate.phase == phase
        assert tuned.gate.tau == (trained.gate.tau if not rerun else 2.0)
        x = torch.randn(64, 16)
        tuned(x)
        assert (tuned.metadata["experts_per_token"].item() == 1.0) == (not rerun)
    halfway = dts_layer(dts_hard_update=100)
    halfway.gate.set_num_updates(40)
    tuned = dts_layer(dts_hard_update=100)
    tuned.load_state_dict(halfway.state_dict())
    tuned.gate.set_num_updates(5)
    assert tuned.gate.tau == halfway.gate.tau and int(tuned.gate.schedule_position) == 40
    tuned.gate.set_num_updates(45)
    assert tuned.gate.tau == trained.gate.schedule.tau(45)
    # a checkpoint written before schedule_position loads, with this run's counter
    old = {k: v for k, v in halfway.state_dict().items() if k != "gate.schedule_position"}
    fresh = dts_layer(dts_hard_update=100)
    fresh.load_state_dict(old)
    fresh.gate.set_num_updates(5)
    assert fresh.gate.tau == trained.gate.schedule.tau(5)
