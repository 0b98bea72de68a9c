"""Behaviour of the baseline gates: BASE, Hash, StableMoE and dense MoE."""

import pytest
import torch
from fairseq.data import Dictionary

from fairseq_evomoe.moe.gates import balanced as base_mod
from fairseq_evomoe.moe.gates.base import build_gate
from fairseq_evomoe.moe.gates.hashing import frequency_balanced_table

from moe_helpers import make_layer, moe_args


def zipf_dictionary(n=200, seed=0, exponent=1.0) -> Dictionary:
    d = Dictionary()
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        d.add_symbol(f"w{i}", n=int(10000 / (i + 1) ** exponent) + int(torch.randint(0, 3, (), generator=g)))
    return d


def gate(name, num_experts=4, dim=16, dictionary=None, **opts):
    torch.manual_seed(0)
    return build_gate(name, dim, num_experts, moe_args(moe_gate=name, moe_expert_count=num_experts, **opts), dictionary)


# -- BASE layer -----------------------------------------------------------------------------


@pytest.mark.parametrize("S,E", [(64, 4), (61, 4), (3, 4), (130, 8)])
@pytest.mark.parametrize("solver", ["auction", "libbase"])
def test_base_training_assignment_is_balanced(S, E, solver):
    if solver == "libbase" and base_mod.libbase is None:
        pytest.skip("fairseq.libbase is not built in this install")
    g = gate("base", num_experts=E, base_solver=solver)
    g.train()
    r = g(torch.randn(S, 16), None)
    counts = torch.bincount(r.expert_idx, minlength=E)
    assert counts.sum() == S and int(counts.max()) - int(counts.min()) <= 1
    assert counts.max() <= -(-S // E)
    torch.testing.assert_close(r.weight, torch.sigmoid(r.priority))  # priority = chosen affinity
    assert r.balance_loss.item() == 0.0


def test_base_assignment_is_optimal():
    scipy_opt = pytest.importorskip("scipy.optimize")
    torch.manual_seed(1)
    S, E = 48, 4
    scores = torch.randn(S, E)
    owner = base_mod.balanced_assignment(scores, "auction")
    total = scores[torch.arange(S), owner].sum().item()
    wide = scores.repeat_interleave(S // E, dim=1).numpy()  # each expert as S/E identical slots
    rows, cols = scipy_opt.linear_sum_assignment(wide, maximize=True)
    optimum = float(wide[rows, cols].sum())
    eps = 1e-3 * float(scores.max() - scores.min())
    assert optimum - S * eps - 1e-4 <= total <= optimum + 1e-4
    # ties (all-equal affinities) still give a valid balanced assignment, with either solver
    for solver in ("auction", "libbase"):
        counts = torch.bincount(base_mod.balanced_assignment(torch.zeros(12, 4), solver), minlength=4)
        assert counts.tolist() == [3, 3, 3, 3]


def test_base_eval_is_greedy_argmax():
    g = gate("base")
    g.eval()
    x = torch.randn(50, 16) + torch.randn(1, 16) * 3  # skewed, so argmax is unbalanced
    r = g(x, None)
    affinity = g.router(x)
    assert torch.equal(r.expert_idx, affinity.argmax(-1))
    torch.testing.assert_close(r.weight, torch.sigmoid(affinity.max(-1).values))


def test_base_weight_trains_the_router():
    g = gate("base")
    g.train()
    r = g(torch.randn(32, 16), None)
    r.weight.sum().backward()
    assert g.router.wg.weight.grad.abs().sum() > 0


def test_base_bad_solver_is_refused():
    with pytest.raises(ValueError, match="--base-solver.*auction, libbase"):
        gate("base", base_solver="hungarian")


# -- Hash layer -----------------------------------------------------------------------------


def test_hash_is_a_function_of_the_token_id():
    d = zipf_dictionary()
    g = gate("hash", dictionary=d)
    g2 = gate("hash", dictionary=d)  # rebuilt: same seed, same table
    seen = {}
    for batch in range(5):
        ids = torch.randint(4, len(d), (40,), generator=torch.Generator().manual_seed(batch))
        r = g(torch.randn(40, 16), ids)
        assert torch.equal(r.expert_idx, g2(torch.randn(40, 16), ids).expert_idx)
        assert torch.all(r.weight == 1.0) and r.balance_loss.item() == 0.0
        for t, e in zip(ids.tolist(), r.expert_idx.tolist()):
            assert seen.setdefault(t, e) == e, "a token id went to two experts"
    assert len(set(seen.values())) == 4
    assert "table" in g.state_dict() and g.state_dict()["table"].shape == (len(d),)
    assert list(g.parameters()) == []


def test_hash_seed_changes_the_table():
    d = zipf_dictionary()
    t1 = gate("hash", dictionary=d, moe_seed=1).table
    t2 = gate("hash", dictionary=d, moe_seed=2).table
    assert not torch.equal(t1, t2)
    b1 = gate("hash", dictionary=d, moe_seed=1, hash_mode="balanced").table
    b2 = gate("hash", dictionary=d, moe_seed=2, hash_mode="balanced").table
    assert not torch.equal(b1, b2)
    # without a dictionary the on-the-fly hash equals the table
    ids = torch.arange(len(d))
    assert torch.equal(gate("hash", moe_seed=1)(torch.randn(len(d), 16), ids).expert_idx, t1)


def test_hash_balanced_table_spreads_frequency_mass():
    d = zipf_dictionary(n=500, exponent=0.5)  # no single token outweighs an expert's fair share
    counts = torch.tensor(d.count, dtype=torch.float)
    table = gate("hash", num_experts=8, dictionary=d, hash_mode="balanced").table
    mass = torch.zeros(8).index_add_(0, table, counts)
    # greedy rule: the spread is at most one token's count, and far below the random hash's
    assert counts.max() < counts.sum() / 8
    rest = counts.sort(descending=True).values[8:]  # the top 8 tokens each open an expert
    assert mass.max() - mass.min() <= rest.max()
    rnd = torch.zeros(8).index_add_(0, gate("hash", num_experts=8, dictionary=d).table, counts)
    assert (mass.max() - mass.min()) < 0.5 * (rnd.max() - rnd.min())
    assert torch.equal(table, frequency_balanced_table(d.count, 8, 1))


def test_hash_option_errors():
    with pytest.raises(ValueError, match="--hash-mode.*random, balanced"):
        gate("hash", dictionary=zipf_dictionary(), hash_mode="modulo")
    with pytest.raises(ValueError, match="--hash-mode balanced"):
        gate("hash", hash_mode="balanced")


# -- StableMoE ------------------------------------------------------------------------------


def test_stablemoe_stage1_distillation_learns_the_routing():
    d = zipf_dictionary(n=60)
    g = gate("stablemoe", dictionary=d, stablemoe_stage2_update=100)
    g.set_num_updates(0)
    g.train()
    assert g.stage == 1
    ids = torch.randint(4, len(d), (128,), generator=torch.Generator().manual_seed(0))
    x = torch.randn(128, 16)
    opt = torch.optim.Adam([g.distill_embed.weight, g.distill_proj.weight], lr=0.05)
    losses = []
    for _ in range(30):
        r = g(x, ids)
        opt.zero_grad()
        r.extra_loss.backward()
        losses.append(r.extra_loss.item())
        opt.step()
    # (a repeated id may have several stage-1 targets, so the loss has a floor above 0)
    assert losses[0] > 0 and losses[-1] < 0.6 * losses[0]
    assert r.balance_loss.item() > 0
    assert torch.equal(r.expert_idx, g.router(x).argmax(-1))
    # the distillation target is fixed: it sends no gradient into the main router
    g.router.wg.weight.grad = None
    g(x, ids).extra_loss.backward()
    assert g.router.wg.weight.grad is None or g.router.wg.weight.grad.abs().sum() == 0


def test_stablemoe_stage2_routing_is_frozen_by_token_id():
    d = zipf_dictionary(n=60)
    g = gate("stablemoe", dictionary=d, stablemoe_stage2_update=10)
    g.train()
    g.set_num_updates(9)
    assert g.stage == 1
    g.set_num_updates(10)
    assert g.stage == 2 and g.state_for_logging() == {"phase": 2}
    table = g.frozen_table.clone()
    assert torch.equal(table, g.distilled_logits(torch.arange(len(d))).argmax(-1))

    ids = torch.randint(4, len(d), (64,), generator=torch.Generator().manual_seed(0))
    r1 = g(torch.randn(64, 16), ids)
    r2 = g(torch.randn(64, 16) * 5, ids)  # other hidden states, same ids -> same experts
    assert torch.equal(r1.expert_idx, table[ids]) and torch.equal(r1.expert_idx, r2.expert_idx)
    assert r1.balance_loss.item() == 0.0 and r1.extra_loss.item() == 0.0

    distilled = [g.distill_embed.weight, g.distill_proj.weight]
    before = [p.detach().clone() for p in distilled]
    opt = torch.optim.Adam(g.parameters(), lr=0.1)
    (r1.weight.sum() + r1.extra_loss).backward()
    for p in distilled:
        assert p.grad is not None and torch.all(p.grad == 0)
    opt.step()
    for p, b in zip(distilled, before):
        assert torch.equal(p, b), "the distilled router moved in stage 2"
    # even if its parameters moved (momentum, weight decay), the routing would not
    with torch.no_grad():
        g.distill_proj.weight.add_(torch.randn_like(g.distill_proj.weight))
    g.set_num_updates(11)
    assert torch.equal(g(torch.randn(64, 16), ids).expert_idx, r1.expert_idx)


def test_stablemoe_stage_survives_state_dict_and_never_goes_back():
    """Stage 2 and its frozen table come with the checkpoint and stay when the counter goes back
    below the switch (fine-tuning that restarts it); --moe-rerun-schedules follows the counter."""
    d = zipf_dictionary(n=60)
    g = gate("stablemoe", dictionary=d, stablemoe_stage2_update=5)
    g.set_num_updates(7)
    fresh = gate("stablemoe", dictionary=d, stablemoe_stage2_update=5)
    torch.nn.init.normal_(fresh.distill_proj.weight)  # differs, but the table comes from the checkpoint
    fresh.load_state_dict(g.state_dict())
    assert fresh.stage == 2 and torch.equal(fresh.frozen_table, g.frozen_table)  # generate: no counter
    fresh.set_num_updates(8)
    assert torch.equal(fresh.frozen_table, g.frozen_table)  # not recomputed on resume
    fresh.set_num_updates(0)
    assert fresh.stage == 2 and torch.equal(fresh.frozen_table, g.frozen_table)
    rerun = gate("stablemoe", dictionary=d, stablemoe_stage2_update=5, moe_rerun_schedules=True)
    rerun.load_state_dict(g.state_dict())
    rerun.set_num_updates(3)
    assert rerun.stage == 1


def test_stablemoe_option_errors():
    with pytest.raises(ValueError, match="--stablemoe-stage2-update"):
        gate("stablemoe", stablemoe_stage2_update=-5)
    with pytest.raises(ValueError, match="--stablemoe-distill-wt"):
        gate("stablemoe", stablemoe_distill_wt=-1.0)
    with pytest.raises(ValueError, match="--stablemoe-distill-wt must be a finite number, got nan"):
        gate("stablemoe", stablemoe_distill_wt=float("nan"))


# -- dense MoE ------------------------------------------------------------------------------


def test_dense_moe_uses_every_expert_on_every_token():
    E, S = 4, 30
    g = gate("dense_moe", num_experts=E)
    for train in (True, False):
        g.train(train)
        r = g(torch.randn(S, 16), None)
        assert not r.droppable and r.token_idx.numel() == S * E
        pairs = set(zip(r.token_idx.tolist(), r.expert_idx.tolist()))
        assert pairs == {(t, e) for t in range(S) for e in range(E)}
        sums = torch.zeros(S).index_add_(0, r.token_idx, r.weight)
        torch.testing.assert_close(sums, torch.ones(S))
        assert r.balance_loss.item() == 0.0


def test_dense_moe_capacity_never_drops():
    layer = make_layer("dense_moe", capacity_factor=0.25)
    layer.train()
    layer(torch.randn(40, 16), torch.randint(4, 50, (40,)))
    assert layer.metadata["dropped_frac"].item() == 0.0
    assert layer.metadata["experts_per_token"].item() == 4.0


def test_top2_random_keeps_the_runner_up_with_twice_its_normalised_weight():
    """GShard's Algorithm 1: g2 <- g2 / (g1 + g2), and the runner-up is kept when 2 g2 > U(0, 1);
    its weight (and the first expert's) are the normalised ones whether or not it is kept."""
    torch.manual_seed(0)
    gate = build_gate("top2", 32, 16, moe_args(moe_second_expert_policy="random")).train()
    x = torch.randn(20000, 32) * 3
    with torch.no_grad():
        routing = gate(x)
    S = x.shape[0]
    p1, p2 = routing.probs.topk(2, dim=-1).values.unbind(-1)
    w2 = p2 / (p1 + p2)
    kept = routing.valid[S:].float()
    assert kept.mean().item() == pytest.approx((2 * w2).clamp(max=1).mean().item(), abs=0.01)
    assert (2 * p2).clamp(max=1).mean().item() < kept.mean().item() - 0.1  # not the raw p2 (the old rule)
    assert torch.allclose(routing.weight[S:], w2) and torch.allclose(routing.weight[:S], p1 / (p1 + p2))
    gate.eval()
    with torch.no_grad():
        assert gate(x).valid is None  # evaluation takes the runner-up


def test_libbase_missing_is_refused_before_training_not_at_load(monkeypatch):
    """--base-solver libbase where fairseq's libbase extension is not built: the model builds, so a
    checkpoint loads for evaluation (which routes by argmax, never calling the solver), and
    fairseq's Trainer is refused before it starts."""
    from types import SimpleNamespace

    from fairseq_evomoe.models.model_checks import checking_before_training

    monkeypatch.setattr(base_mod, "libbase", None)
    model = torch.nn.Sequential(make_layer("base", base_solver="libbase"))
    assert model.eval()(torch.randn(5, 2, 16)).shape == (5, 2, 16)  # evaluation runs without the solver
    started = []
    init = checking_before_training(lambda self, cfg, task, model, criterion: started.append(True))
    with pytest.raises(ValueError, match=r"--base-solver libbase needs fairseq's C\+\+ extension .*use --base-solver auction"):
        init(SimpleNamespace(checkpoint_suffix=""), SimpleNamespace(), None, model, object())
    assert not started
