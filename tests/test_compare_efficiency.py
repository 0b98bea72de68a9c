"""benchmarks/compare/efficiency.py: what a gate spends to reach Switch's final validation loss."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # plot_routing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from compare.efficiency import compute_at, cost_to_reach_switch, updates_to_reach, verdict  # noqa: E402


def run(gate, seed, valid, compute, updates=100, final=None):
    xs = [u for u, _ in valid]
    return {"gate": gate, "seed": seed, "updates": updates, "valid_updates": xs, "valid_loss": [v for _, v in valid],
            "final_valid_loss": final if final is not None else valid[-1][1],
            "train_curve": {"updates": [u for u, _ in compute], "moe_expert_compute": [c for _, c in compute]}}


def test_updates_and_compute_are_interpolated():
    assert updates_to_reach([50, 100], [6.0, 4.0], 5.0) == 75
    assert updates_to_reach([50, 100], [6.0, 5.5], 5.0) is None
    r = run("evomoe", 1, [(100, 4.0)], [(10, 20), (50, 100), (100, 150)])
    assert compute_at(r, 5) == 10 and compute_at(r, 75) == 125 and compute_at(r, 200) == 150
    assert compute_at({"train_curve": {"updates": [1], "inner_loss": [3.0]}}, 1) is None  # dense: no expert compute


def test_cost_against_switch_and_the_verdict():
    switch = run("switch", 1, [(50, 6.0), (100, 5.0)], [(50, 50), (100, 100)])
    fast_cheap = run("evomoe", 1, [(50, 5.5), (70, 4.9)], [(50, 40), (100, 90)])
    cost = cost_to_reach_switch(fast_cheap, switch)
    assert cost["updates"] == pytest.approx(2 / 3) and cost["compute"] == pytest.approx(0.85 * 2 / 3)  # 56.7 of 100
    assert "evomoe meets the target" in verdict([switch, fast_cheap], "evomoe")
    costly = run("evomoe_scheduled", 1, [(50, 5.5), (70, 4.9)], [(50, 150), (100, 300)])
    assert "does not meet" in verdict([switch, costly], "evomoe_scheduled")
    never = run("evomoe", 1, [(50, 6.5), (100, 5.5)], [(100, 80)])
    assert cost_to_reach_switch(never, switch) is None
    assert "never reached" in verdict([switch, never], "evomoe")
    assert verdict([fast_cheap], "evomoe") is None  # no Switch run to compare with


def test_switch_effect_reads_the_loss_step_and_the_rerouted_tokens():
    from compare.switch_effect import hard_update, switch_effect

    assert hard_update(1000) == 600 and hard_update(40) == 24  # configs/gate/evomoe.yaml: dts_hard_update 0.6
    xs = list(range(10, 110, 10))
    loss = [6.0, 5.9, 6.0, 5.9, 6.0, 5.9, 5.5, 5.6, 5.5, 5.6]  # alternating lines, then a drop of 0.4
    changed = [None] * 6 + [80.0, 79.0, 78.0, 77.0]
    e = switch_effect({"updates": xs, "inner_loss": loss, "moe_switch_changed_pct": changed}, hard=60, spread_from=20, lines=2)
    assert e["change"] == pytest.approx(-0.4)  # (5.5 + 5.6) / 2 - (6.0 + 5.9) / 2
    assert e["spread"] == pytest.approx((0.04 / 3) ** 0.5)  # sample std of the steps +0.1, -0.1, +0.1, -0.1 (lines 20-60)
    assert e["trend"] == pytest.approx(0.0, abs=1e-12)  # the steps before it cancel out: no trend
    assert e["rerouted"] == 80.0  # the first top-1 line
    steady = switch_effect({"updates": xs, "inner_loss": [6.0 - 0.1 * i for i in range(10)]}, hard=60, spread_from=20, lines=2)
    assert steady["change"] == pytest.approx(-0.2) and steady["trend"] == pytest.approx(-0.2)  # a steady fall, no jump
    switch = switch_effect({"updates": xs, "inner_loss": loss}, hard=60, spread_from=20, lines=2)
    assert switch["rerouted"] is None  # a run that logs no switch (Switch, for reference)
    assert switch_effect({"updates": xs[:7], "inner_loss": loss[:7]}, hard=60, spread_from=20, lines=2) is None


def test_a_result_stored_with_repeated_log_lines_is_read_with_one_line_per_update():
    """Results stored before the log parser kept one line per update hold, for a resumed run, the
    lines its interrupted attempt had logged too; read back, each update counts once (the last)."""
    from compare.run_store import one_line_per_update

    clean = {"valid_updates": [50, 100, 150], "valid_loss": [5.0, 4.5, 4.2], "experts_per_token": 2.25,
             "train_curve": {"updates": [10, 20, 30, 40], "inner_loss": [6.0, 5.8, 5.7, 5.5],
                             "moe_experts_per_token": [4.0, 3.0, 1.0, 1.0]}}
    repeated = {"valid_updates": [50, 100, 100, 100, 150], "valid_loss": [5.0, 4.6, 4.6, 4.5, 4.2], "experts_per_token": 2.5,
                "train_curve": {"updates": [10, 20, 20, 20, 20, 30, 40], "inner_loss": [6.0, 5.9, 5.9, 5.9, 5.8, 5.7, 5.5],
                                "moe_experts_per_token": [4.0, 3.0, 3.0, 3.0, 3.0, 1.0, 1.0]}}
    assert one_line_per_update(repeated) == clean
    assert one_line_per_update(clean) == clean
