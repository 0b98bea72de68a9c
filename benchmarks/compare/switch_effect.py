"""What EvoMoE's hard switch to top-1 does to a run, read off its training curve: the change of the
training task loss across the switch (the mean of the log lines just after minus the mean of those
just before), what the loss's trend before the switch alone would give over the same lines, the
normal line-to-line spread of that loss to judge both by, and the share of tokens whose routing the
switch changes (`moe_switch_changed_pct` at the first hard line)."""

import statistics
from typing import Optional

LINES = 4  # log lines averaged on each side of the switch


def hard_update(updates: int, gate: str = "evomoe", extra_dir=None) -> Optional[int]:
    """The update from which a comparison's EvoMoE gate routes top-1: its config's dts_hard_update
    (configs/gate/evomoe.yaml's by default; a fraction of the run or a count), resolved as the
    plugin resolves it; None for a config without one."""
    from fairseq_evomoe.evomoe.schedule import resolve_updates

    from .flags import load_group_config

    value = load_group_config("gate", gate, extra_dir).get("dts_hard_update")
    return None if value is None else resolve_updates(float(value), updates, "--dts-hard-update")


def switching_like_evomoe(gates, updates: int, extra_dir=None) -> list:
    """The EvoMoE gates among `gates` that switch to top-1 at gate=evomoe's update (the switch table
    and plot compare runs around one update)."""
    hard = hard_update(updates)
    return [g for g in gates if g.startswith("evomoe") and hard_update(updates, g, extra_dir) == hard]


def switch_effect(curve: dict, hard: int, spread_from: int, lines: int = LINES) -> Optional[dict]:
    """{"change", "trend", "spread", "rerouted"} for one run's train_curve around update `hard`: the
    loss change across it; over the lines from `spread_from` to `hard`, the mean line-to-line change
    times `lines` (the two means are `lines` lines apart, so a steady trend alone gives that) and the
    standard deviation of the line-to-line change; and the percentage of tokens rerouted (None for a
    run that does not log it, such as Switch, shown for reference). None when the curve has too few
    lines around `hard`."""
    pts = [(x, y) for x, y in zip(curve.get("updates") or [], curve.get("inner_loss") or []) if y is not None]
    before = [y for x, y in pts if x <= hard][-lines:]
    after = [y for x, y in pts if x > hard][:lines]
    window = [y for x, y in pts if spread_from <= x <= hard]
    steps = [b - a for a, b in zip(window, window[1:])]
    if len(before) < lines or len(after) < lines or len(steps) < 2:
        return None
    changed = [c for x, c in zip(curve.get("updates") or [], curve.get("moe_switch_changed_pct") or [])
               if x > hard and c is not None]
    return {"change": statistics.mean(after) - statistics.mean(before), "trend": statistics.mean(steps) * lines,
            "spread": statistics.stdev(steps),
            "rerouted": changed[0] if changed else None}
