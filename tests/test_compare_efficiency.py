"""scripts/compare/efficiency.py: what a gate spends to reach Switch's final validation loss."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

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
