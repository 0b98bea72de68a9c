"""EvoMoE's schedule: temperature curves, phases and start-up validation (pure functions)."""

import math
from argparse import Namespace

import pytest

from fairseq_evomoe.evomoe.schedule import EvoMoESchedule, Phase, anneal, resolve_updates, temperature


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_temperature_boundaries(kind):
    assert temperature(0, 2.0, 0.5, 100, kind) == pytest.approx(2.0)
    assert temperature(100, 2.0, 0.5, 100, kind) == pytest.approx(0.5)
    assert temperature(10_000, 2.0, 0.5, 100, kind) == pytest.approx(0.5)
    assert temperature(-5, 2.0, 0.5, 100, kind) == pytest.approx(2.0)  # before the phase starts
    values = [temperature(t, 2.0, 0.5, 100, kind) for t in range(0, 101, 10)]
    assert all(a >= b for a, b in zip(values, values[1:])), "temperature must not increase"


def test_temperature_in_between():
    assert temperature(50, 2.0, 0.5, 100, "linear") == pytest.approx(1.25)
    assert temperature(50, 2.0, 0.5, 100, "exponential") == pytest.approx(2.0 * math.sqrt(0.25))
    assert temperature(50, 2.0, 0.5, 100, "cosine") == pytest.approx(1.25)
    assert temperature(25, 2.0, 0.5, 100, "cosine") == pytest.approx(0.5 + 0.75 * (1 + math.cos(math.pi / 4)))


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="linear, exponential, cosine"):
        temperature(1, 2.0, 0.5, 10, "step")


def test_phases_and_tau_counted_from_the_spawn():
    s = EvoMoESchedule(diversify_updates=10, anneal_updates=20, hard_update=40, tau_max=2.0, tau_min=0.5)
    assert s.phase(0) == s.phase(9) == Phase.DIVERSIFY
    assert s.phase(10) == s.phase(39) == Phase.SOFT
    assert s.phase(40) == s.phase(10_000) == Phase.HARD
    assert s.tau(5) == pytest.approx(2.0)
    assert s.tau(10) == pytest.approx(2.0)
    assert s.tau(20) == pytest.approx(1.25)
    assert s.tau(30) == pytest.approx(0.5)


def test_resolve_updates_counts_and_fractions():
    assert resolve_updates(100, 1000, "--x") == 100
    assert resolve_updates(0.25, 1000, "--x") == 250
    assert resolve_updates(0, 1000, "--x") == 0
    assert resolve_updates(None, 1000, "--x") is None
    with pytest.raises(ValueError, match="--x 0.5 is a fraction of --max-update"):
        resolve_updates(0.5, 0, "--x")
    with pytest.raises(ValueError, match="--x must be >= 0"):
        resolve_updates(-1, 10, "--x")
    with pytest.raises(ValueError, match="whole number"):
        resolve_updates(2.5, 10, "--x")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"--x must be a finite number, got {bad}"):
            resolve_updates(bad, 10, "--x")


def schedule_args(**kw):
    base = dict(max_update=1000, evomoe_diversify_updates=100, dts_anneal_updates=300, dts_hard_update=None,
                dts_tau_max=2.0, dts_tau_min=0.5, dts_tau_schedule="linear", dts_allow_hard_start=False)
    base.update(kw)
    return Namespace(**base)


def test_from_args_defaults_hard_switch_to_end_of_annealing():
    s = EvoMoESchedule.from_args(schedule_args())
    assert (s.diversify_updates, s.anneal_updates, s.hard_update) == (100, 300, 400)
    s = EvoMoESchedule.from_args(schedule_args(evomoe_diversify_updates=0.1, dts_anneal_updates=0.5, dts_hard_update=0.7))
    assert (s.diversify_updates, s.anneal_updates, s.hard_update) == (100, 500, 700)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dts_hard_update=50), "--dts-hard-update \\(50\\) is not after the expert spawn"),
        (dict(dts_hard_update=100), "--dts-hard-update \\(100\\) is not after the expert spawn"),
        (dict(dts_anneal_updates=0), "--dts-anneal-updates \\(D\\) must be > 0"),
        (dict(dts_tau_min=3.0), "--dts-tau-min \\(3.0\\) must not exceed --dts-tau-max \\(2.0\\)"),
        (dict(dts_tau_min=0.0), "--dts-tau-min must be > 0"),
        (dict(evomoe_diversify_updates=1000), "--evomoe-diversify-updates \\(1000\\) must be below --max-update \\(1000\\)"),
        (dict(dts_tau_schedule="step"), "--dts-tau-schedule 'step' is not valid"),
        (dict(dts_tau_max=float("nan")), "--dts-tau-max must be a finite number, got nan"),
        (dict(dts_tau_min=float("nan")), "--dts-tau-min must be a finite number, got nan"),
        (dict(dts_tau_max=float("inf")), "--dts-tau-max must be a finite number, got inf"),
    ],
)
def test_contradictory_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        EvoMoESchedule.from_args(schedule_args(**overrides))


def test_a_short_fine_tune_of_a_spawned_checkpoint_is_not_refused_for_its_fractions():
    """Fractions of a 2-update fine-tune put T_div and H at update 1 (H not after the spawn); the
    fine-tuned checkpoint's experts are spawned and its saved counts replace these, so no error."""
    short = dict(max_update=2, evomoe_diversify_updates=0.1, dts_anneal_updates=0.5, dts_hard_update=0.6)
    with pytest.raises(ValueError, match="--dts-hard-update \\(1\\) is not after the expert spawn at update 1"):
        EvoMoESchedule.from_args(schedule_args(**short))
    s = EvoMoESchedule.from_args(schedule_args(**short, evomoe_restores_spawned_experts=True))
    assert (s.diversify_updates, s.hard_update) == (1, 1)


def test_hard_start_only_when_asked():
    s = EvoMoESchedule.from_args(schedule_args(evomoe_diversify_updates=0, dts_hard_update=0, dts_allow_hard_start=True))
    assert s.phase(0) == Phase.HARD


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_experts_per_token_schedule_goes_from_k_start_to_one_from_the_spawn(kind):
    s = EvoMoESchedule(diversify_updates=10, anneal_updates=100, hard_update=110, tau_schedule=kind)
    assert s.experts_per_token(0, 8) == 8 and s.experts_per_token(10, 8) == 8
    assert s.experts_per_token(110, 8) == 1 and s.experts_per_token(500, 8) == 1
    mid = s.experts_per_token(60, 8)
    assert 1 < mid < 8 and mid == anneal(50, 8, 1.0, 100, kind)
    assert s.experts_per_token(60, 1) == 1
