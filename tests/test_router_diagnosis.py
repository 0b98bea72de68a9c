"""What a user diagnosing the DTS gate relies on: the hard phase's routing and combine-weight
options, the router statistics (logit spread, top gap, agreement of the training expert with the
evaluation expert) computed only when a step logs, the separate balance-loss weight of the soft
phase, and the evaluation routings that scripts/evaluate_routing.py compares."""

import math

import pytest
import torch
import torch.nn as nn
from fairseq import metrics

from fairseq_evomoe.criterions.moe_loss import MoELossMixin, reduce_moe_metrics
from fairseq_evomoe.evomoe.schedule import Phase
from fairseq_evomoe.moe.gates.base import build_gate

from moe_helpers import make_layer, moe_args

E = 4


def hard_gate(seed=0, **kw):
    """A DTS gate in its hard phase (from update 10) whose router prefers expert 0 (l = (2, 0, 0, 0))
    for x = e_0: Gumbel noise sends about 29% of such tokens elsewhere, argmax(l) none."""
    opts = dict(dts_anneal_updates=10, dts_hard_update=10, evomoe_diversify_updates=0)
    opts.update(kw)
    torch.manual_seed(seed)
    gate = build_gate("dts", 16, E, moe_args(moe_gate="dts", moe_expert_count=E, **opts))
    gate.train()
    gate.set_num_updates(10)
    assert gate.phase == Phase.HARD
    with torch.no_grad():
        gate.router.wg.weight.zero_()
        gate.router.wg.weight[0, 0] = 2.0
    return gate


def tokens(n=4000):
    x = torch.zeros(n, 16)
    x[:, 0] = 1.0
    return x


def test_hard_routing_argmax_routes_as_evaluation_and_sample_does_not():
    x = tokens()
    sampled, argmax = hard_gate(dts_hard_routing="sample"), hard_gate(dts_hard_routing="argmax")
    assert hard_gate().hard_routing == "argmax"  # the default
    for gate in (sampled, argmax):
        gate.collect_stats = True
    torch.manual_seed(1)
    r_sample = sampled(x, None)
    torch.manual_seed(1)
    r_argmax = argmax(x, None)
    assert (r_argmax.expert_idx == 0).all() and r_argmax.droppable
    share_elsewhere = (r_sample.expert_idx != 0).float().mean().item()
    assert share_elsewhere == pytest.approx(1 - torch.tensor([2.0, 0, 0, 0]).softmax(-1)[0].item(), abs=0.03)
    total, count = r_sample.sampled_stats["hard_eval_agree_pct"]
    assert count.item() == 4000 and total.item() / count.item() == pytest.approx(100 * (1 - share_elsewhere))
    total, count = r_argmax.sampled_stats["hard_eval_agree_pct"]
    assert total.item() / count.item() == 100.0
    # the noise is drawn either way: both options leave the random stream at the same place
    after_argmax = torch.rand(3)
    torch.manual_seed(1)
    sampled(x, None)
    assert torch.equal(torch.rand(3), after_argmax)


def test_hard_combine_weights_gumbel_are_the_chosen_experts_gumbel_softmax_weight():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    gate = hard_gate(dts_hard_routing="sample", dts_hard_combine_weights="gumbel", dts_tau_min=0.7)
    gate.router.reset_parameters(torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    r = gate(x, None)
    with torch.no_grad():
        logits = x @ gate.router.wg.weight.t()
        torch.manual_seed(5)
        u = torch.rand(logits.shape).clamp_(min=1e-9, max=1.0 - 1e-7)
        y = ((logits - torch.log(-torch.log(u))) / 0.7).softmax(-1)
    assert gate.tau == 0.7
    assert torch.equal(r.expert_idx, y.argmax(-1))
    torch.testing.assert_close(r.weight, y.gather(1, r.expert_idx[:, None]).squeeze(1))
    assert r.weight.requires_grad  # the router learns through the Gumbel-softmax weight
    chosen = torch.nn.functional.one_hot(r.expert_idx, E).float()
    torch.testing.assert_close(r.balance_loss, E * torch.sum((y * chosen).mean(0) * chosen.mean(0)))


@pytest.mark.parametrize("option, value", [("dts_hard_routing", "top1"), ("dts_hard_combine_weights", "uniform")])
def test_bad_hard_phase_options_are_named(option, value):
    with pytest.raises(ValueError, match="--" + option.replace("_", "-") + ".*choose one of"):
        hard_gate(**{option: value})


@pytest.mark.parametrize("gate", ["top1", "top2", "hash", "stablemoe", "dts"])
def test_between_log_lines_a_layer_leaves_only_its_losses_and_kept_count(gate):
    """collect_stats off (a training update fairseq does not log, or generation): the metadata holds
    the losses the criterion adds and the kept assignments (the expert compute count), nothing else."""
    layer = make_layer(gate, num_experts=E, seed=0, capacity_factor=1.0, stats=False).train()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(4, 50, (64,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    layer(x, ids)
    assert set(layer.metadata) <= {"balance_loss", "z_loss", "extra_loss", "kept_assignments"}
    kept = layer.metadata["kept_assignments"].item()
    layer.collect_stats = True
    torch.manual_seed(0)  # the same noise: collecting statistics draws no random numbers
    layer(x, ids)
    assert layer.metadata["tokens_per_expert"].sum().item() == kept > 0


def test_router_statistics_are_computed_only_when_collected():
    layer = make_layer("top1", num_experts=E, seed=0, stats=False).train()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    layer(x)
    assert not any(k.startswith("stat_") for k in layer.metadata)
    layer.collect_stats = True
    layer(x)
    with torch.no_grad():
        logits = x @ layer.gate.router.wg.weight.t()
    total, n = layer.metadata["stat_router_logit_std"]
    assert n.item() == 64
    assert total.item() / 64 == pytest.approx(logits.std(-1, unbiased=False).mean().item(), rel=1e-5)
    top = logits.topk(2, -1).values
    total, n = layer.metadata["stat_router_top_gap"]
    assert total.item() / 64 == pytest.approx((top[:, 0] - top[:, 1]).mean().item(), rel=1e-5)


class ToyTaskLoss:
    """A task criterion's forward: the sum of squared outputs of the MoE layers in a residual stack."""

    def forward(self, model, x, reduce=True):
        h = x
        for layer in model:
            h = h + layer(h)
        return h.pow(2).sum(), x.shape[0], {"sample_size": x.shape[0], "ntokens": x.shape[0]}


class ToyCriterion(MoELossMixin, ToyTaskLoss):
    def __init__(self, log_interval=5, soft_wt=-1.0, wt=0.01):
        self.init_moe_loss(wt, "average", 0.0, False, soft_wt, log_interval)


def hard_dts_layers():
    """Two layers whose statistics the criterion switches on and off, as in fairseq-train (the DTS
    gate's hard phase samples, so that its agreement with evaluation is a statistic)."""
    model = nn.ModuleList([make_layer("dts", num_experts=E, seed=0, dts_anneal_updates=10, dts_hard_update=10,
                                      evomoe_diversify_updates=0, dts_hard_routing="sample", stats=False),
                           make_layer("top1", num_experts=E, seed=1, stats=False)])
    model[0].layer_name, model[1].layer_name = "enc0", "dec0"
    return model


def set_updates(model, num_updates):
    """What fairseq's model.set_num_updates does: every module that has the method gets the count."""
    for m in model.modules():
        if hasattr(m, "set_num_updates"):
            m.set_num_updates(num_updates)


def logged(logs):
    with metrics.aggregate(new_root=True) as agg:
        reduce_moe_metrics(logs)
        return agg.get_smoothed_values()


STAT_METRICS = {"moe_router_logit_std", "moe_router_top_gap", "moe_hard_eval_agree_pct"}


def test_statistics_come_on_the_updates_fairseq_logs_and_in_validation_only():
    """fairseq-train logs after update n when n % --log-interval == 0; the model was told the
    update before it (num_updates = n - 1): with --log-interval 5 the forwards of updates 5 and 10
    (num_updates 4 and 9) collect, those of 1-4 and 6-9 do not; validation always does."""
    model, crit = hard_dts_layers(), ToyCriterion(log_interval=5)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    collected = []
    for num_updates in range(10, 20):
        model.train()
        set_updates(model, num_updates)
        _, _, log = crit.forward(model, x)
        collected.append(any(k.startswith("_moe_stat_") for k in log))
        assert not any(m.collect_stats for m in model)  # only during the criterion's forward
    assert collected == [(n + 1) % 5 == 0 for n in range(10, 20)]
    model.train()
    set_updates(model, 14)
    torch.manual_seed(0)
    _, _, train_log = crit.forward(model, x)
    shown = logged([train_log])
    assert STAT_METRICS <= set(shown)
    assert 0 < shown["moe_hard_eval_agree_pct"] < 100  # sampled hard routing (only enc0 reports it)
    assert shown["moe_router_logit_std"] > 0 and shown["moe_router_top_gap"] > 0
    model.eval()
    _, _, valid_log = crit.forward(model, x)
    shown = logged([valid_log])
    assert {"moe_router_logit_std", "moe_router_top_gap"} <= set(shown)
    assert "moe_hard_eval_agree_pct" not in shown  # evaluation routes by argmax(l) itself


def test_sampled_statistics_pool_over_forwards_and_layers():
    """A logged statistic: per layer the sum over every forward the line covers over their tokens,
    then the mean over the layers that report it."""
    model, crit = hard_dts_layers().train(), ToyCriterion(log_interval=1)
    logs, per_layer = [], {0: [0.0, 0.0], 1: [0.0, 0.0]}
    for n in (300, 7):
        x = torch.randn(n, 16, generator=torch.Generator().manual_seed(n))
        _, _, log = crit.forward(model, x)
        logs.append(log)
        for i, m in enumerate(model):
            total, count = m.metadata["stat_router_top_gap"]
            per_layer[i][0] += total.item()
            per_layer[i][1] += count.item()
    expected = sum(t / c for t, c in per_layer.values()) / 2
    assert logged(logs)["moe_router_top_gap"] == pytest.approx(expected, abs=1.5e-3)


def test_soft_phase_balance_weight_applies_to_soft_layers_only():
    """--moe-soft-gate-loss-wt weighs the balance loss of layers whose DTS gate is in its soft phase;
    the other layers keep --moe-gate-loss-wt; -1 is the loss without the option, to the bit; the
    default is 0."""
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(0))

    def gate_term(soft_wt, updates):
        model = hard_dts_layers().train()
        set_updates(model, updates)
        torch.manual_seed(0)
        _, _, log = ToyCriterion(soft_wt=soft_wt, wt=0.01).forward(model, x)
        balance = [m.metadata["balance_loss"].item() for m in model]
        return log["moe_gate_loss"].item(), balance

    default, balance = gate_term(-1.0, 5)  # update 5: enc0 soft
    assert default == pytest.approx(100 * 0.01 * sum(balance) / 2, rel=1e-6)
    zero, balance0 = gate_term(0.0, 5)
    assert balance0 == balance and zero == pytest.approx(100 * 0.01 * balance[1] / 2, rel=1e-6)
    tripled, _ = gate_term(0.03, 5)
    assert tripled == pytest.approx(100 * (0.03 * balance[0] + 0.01 * balance[1]) / 2, rel=1e-6)
    hard, balance_h = gate_term(0.0, 12)  # hard phase: --moe-gate-loss-wt again
    assert hard == pytest.approx(100 * 0.01 * sum(balance_h) / 2, rel=1e-6)
    assert gate_term(0.01, 5)[0] == default  # the same weight given twice takes the default's path


@pytest.mark.parametrize("gate, updates", [("stablemoe", 0), ("stablemoe", 20), ("top1", 0), ("top2", 0), ("hash", 0),
                                            ("base", 0), ("dts", 12), ("dts-diversify", 0)])
def test_only_the_dts_soft_phase_takes_the_soft_balance_weight(gate, updates):
    """Every other layer's balance loss is weighted by --moe-gate-loss-wt, whatever
    --moe-soft-gate-loss-wt says: StableMoE's stage 1 (whose logged `phase` is 1, as the DTS soft
    phase's), the other baselines, the DTS hard phase, and an EvoMoE layer before its spawn."""
    kw = dict(stablemoe_stage2_update=10) if gate == "stablemoe" else {}
    if gate.startswith("dts"):
        kw = dict(dts_anneal_updates=10, dts_hard_update=10, evomoe_diversify_updates=0)
    model = nn.ModuleList([make_layer(gate.split("-")[0], num_experts=E, seed=0, stats=False,
                                      diversify=gate == "dts-diversify", **kw)]).train()
    set_updates(model, updates)
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(0))
    token_ids = torch.arange(100)
    assert not model[0].routes_dense_to_sparse()
    crit = ToyCriterion(soft_wt=0.0, wt=0.01)
    assert crit.balance_weights(list(model)) is None
    if gate != "dts-diversify":
        model[0](x, token_ids) if gate in ("hash", "stablemoe") else model[0](x)
        balance = model[0].metadata["balance_loss"].item()
        _, _, log = crit.add_moe_loss(model, torch.zeros(()), 100, {})
        extra = model[0].metadata["extra_loss"].item() if "extra_loss" in model[0].metadata else 0.0
        has_balance_loss = gate in ("top1", "top2", "dts") or (gate, updates) == ("stablemoe", 0)  # hash, BASE: none
        assert (balance > 0) == has_balance_loss
        assert log["moe_gate_loss"].item() == pytest.approx(100 * 0.01 * balance, rel=1e-6)
        # a gate's own term (StableMoE's distillation) is logged apart, and optimised with the rest
        assert log.get("moe_extra_loss", torch.zeros(())).item() == pytest.approx(100 * extra, rel=1e-6)
        assert ("moe_extra_loss" in log) == (gate == "stablemoe")
        assert log["loss"].item() == pytest.approx(100 * (0.01 * balance + extra), rel=1e-6)


def test_soft_phase_balance_weight_defaults_to_none():
    from fairseq_evomoe.criterions.moe_loss import MoELossOptions

    assert MoELossOptions.moe_soft_gate_loss_wt == 0.0


def test_soft_gate_loss_weight_must_be_valid():
    with pytest.raises(ValueError, match="--moe-soft-gate-loss-wt"):
        ToyCriterion(soft_wt=-0.5)
    with pytest.raises(ValueError, match="--moe-gate-loss-wt must be a finite number, got nan"):
        ToyCriterion(wt=float("nan"))
    with pytest.raises(ValueError, match="--moe-soft-gate-loss-wt must be a finite number, got inf"):
        ToyCriterion(soft_wt=float("inf"))


@pytest.mark.parametrize("phase_update", [5, 12])
def test_evaluation_routings_for_diagnosis(phase_update):
    """eval_routing: argmax (evaluation, the default), sample (the training rule of the phase, here
    --dts-hard-routing sample; nothing dropped) and softmax (every expert, weight p)."""
    layer = make_layer("dts", num_experts=E, seed=0, capacity_factor=1.0, dts_anneal_updates=10, dts_hard_update=10,
                       evomoe_diversify_updates=0, dts_hard_routing="sample").eval()
    layer.gate.set_num_updates(phase_update)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    probs = layer.gate.router(x).softmax(-1)
    r = layer.gate(x, None)
    assert torch.equal(r.expert_idx, probs.argmax(-1)) and r.token_idx.numel() == 50
    layer.gate.eval_routing = "softmax"
    r = layer.gate(x, None)
    assert r.token_idx.numel() == 50 * E and not r.droppable
    torch.testing.assert_close(torch.zeros(50, E).index_put((r.token_idx, r.expert_idx), r.weight), probs)
    layer.gate.eval_routing = "sample"
    torch.manual_seed(0)
    r = layer.gate(x, None)
    assert not r.droppable
    if phase_update == 12:
        assert r.token_idx.numel() == 50 and not torch.equal(r.expert_idx, probs.argmax(-1))
    else:
        assert r.token_idx.numel() > 50  # the soft phase's threshold rule at tau > tau_min


@pytest.mark.parametrize("criterion", ["moe_cross_entropy", "moe_label_smoothed_cross_entropy"])
def test_the_criterion_reads_fairseq_trains_log_interval(lm_data, criterion, fairseq_config_conversion):
    """fairseq-train's --log-interval reaches the MoE criteria (through the config), so they know
    which updates log; so does --moe-soft-gate-loss-wt."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from conftest import USER_DIR

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(lm_data), "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "transformer_lm_moe_tiny",
        "--criterion", criterion, "--log-interval", "7", "--moe-soft-gate-loss-wt", "0.5", "--cpu",
    ])
    cfg = convert_namespace_to_omegaconf(args)
    crit = tasks.setup_task(cfg.task).build_criterion(cfg.criterion)
    assert crit.log_interval == 7 and crit.moe_soft_gate_loss_wt == 0.5
    assert [n for n in range(20) if crit.logs_after_this_update(n)] == [6, 13]


def test_expert_compute_counts_every_update_while_statistics_come_with_log_lines():
    """--log-interval 3 over 6 updates: the logging outputs of updates 1, 2, 4, 5 carry no routing
    statistics, only the kept assignments as a tensor (added up without a host read); the logged
    moe_expert_compute at updates 3 and 6 still counts every update's kept assignments."""
    from fairseq_evomoe.criterions.moe_loss import TRAINING_KEPT

    model, crit = hard_dts_layers().train(), ToyCriterion(log_interval=3)
    metrics.reset()
    try:
        kept, shown = [], {}
        for num_updates in range(6):
            set_updates(model, num_updates)
            x = torch.randn(50 + num_updates, 16, generator=torch.Generator().manual_seed(num_updates))
            with metrics.aggregate("train_inner"), metrics.aggregate() as step:  # as fairseq's trainer, every update
                _, _, log = crit.forward(model, x)
                kept.append(sum(m.metadata["kept_assignments"].item() for m in model))
                assert torch.is_tensor(log[TRAINING_KEPT])
                statistics = [k for k in log if k.startswith(("_moe_", "moe_")) and k not in (TRAINING_KEPT, "moe_gate_loss")]
                assert bool(statistics) == ((num_updates + 1) % 3 == 0), statistics
                reduce_moe_metrics([log])
                values = step.get_smoothed_values()
            if "moe_expert_compute" in values:
                shown[num_updates + 1] = values["moe_expert_compute"]
        assert shown == {3: round(sum(kept[:3])), 6: round(sum(kept))}
    finally:
        metrics.reset()
