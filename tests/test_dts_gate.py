"""The Dense-To-Sparse gate: dynamic experts per token, annealing, hard top-1, evaluation."""

import pytest
import torch

from fairseq_evomoe.evomoe.schedule import Phase

from moe_helpers import make_layer


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


def test_selection_threshold_cap_and_weights():
    layer = dts_layer(dts_max_experts=2)
    x = torch.randn(100, 16)
    torch.manual_seed(1)
    r = layer.gate(x, None)
    per_token = torch.bincount(r.token_idx, minlength=100)
    assert per_token.min() >= 1 and per_token.max() <= 2
    probs = r.probs
    torch.testing.assert_close(r.weight, probs[r.token_idx, r.expert_idx])  # default: softmax weights


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
    layer = dts_layer(dts_hard_update=10)
    layer.gate.set_num_updates(10)
    x = torch.randn(64, 16)
    r = layer.gate(x, None)
    assert r.droppable and r.token_idx.numel() == 64
    torch.testing.assert_close(r.weight, r.probs[r.token_idx, r.expert_idx])


def test_balance_loss_matches_the_formula():
    layer = dts_layer()
    x = torch.randn(30, 16)
    r = layer.gate(x, None)
    E = 8
    combine = torch.zeros(30, E).index_put((r.token_idx, r.expert_idx), r.weight.detach())
    selected = torch.zeros(30, E).index_put((r.token_idx, r.expert_idx), torch.ones(r.token_idx.numel()))
    expected = E * (combine.mean(0) * selected.mean(0)).sum()
    assert r.balance_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="--dts-combine-weights 'max' is not valid; choose one of: softmax, gumbel"):
        dts_layer(dts_combine_weights="max")
    with pytest.raises(ValueError, match="--dts-max-experts"):
        dts_layer(dts_max_experts=-1)


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
