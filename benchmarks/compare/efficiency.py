"""What it costs each gate to reach Switch's final validation loss: updates (interpolated between
validations) and expert compute (the cumulative token-expert assignments the criterion logs as
`moe_expert_compute`, read off the run's training curve at that update), each as a multiple of the
Switch run's own total for the same seed; and the target the comparison is judged by."""

import statistics
from typing import Dict, List, Optional

# EvoMoE's target: Switch's final validation loss in at most this share of Switch's updates,
# spending no more expert compute than Switch spent in its whole run
TARGET_UPDATES = 0.8
TARGET_COMPUTE = 1.0


def updates_to_reach(xs: list, ys: list, target: float) -> Optional[float]:
    """First update at which the validation loss reaches `target` (linear interpolation)."""
    prev = None
    for x, y in zip(xs, ys):
        if y <= target:
            if prev is None or prev[1] == y:
                return x
            (x0, y0) = prev
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
        prev = (x, y)
    return None


def compute_at(result: dict, update: float) -> Optional[float]:
    """Cumulative expert compute of a run at `update` (linear between its log lines); None for a run
    that logs none (the dense model)."""
    curve = result.get("train_curve") or {}
    xs, ys = curve.get("updates") or [], curve.get("moe_expert_compute") or []
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if not pts:
        return None
    x0, y0 = 0.0, 0.0
    for x, y in pts:
        if update <= x:
            return y0 + (y - y0) * (update - x0) / (x - x0) if x > x0 else y
        x0, y0 = x, y
    return pts[-1][1]


def cost_to_reach_switch(result: dict, switch: dict) -> Optional[Dict[str, Optional[float]]]:
    """{"at": update, "updates": ..., "compute": ...}: the update at which `result` reaches `switch`'s
    final validation loss, and that update and the expert compute spent by then as multiples of
    Switch's updates and total expert compute; None when it is never reached."""
    at = updates_to_reach(result["valid_updates"], result["valid_loss"], switch["final_valid_loss"])
    if at is None:
        return None
    total = compute_at(switch, switch["updates"])
    used = compute_at(result, at)
    return {"at": at, "updates": at / switch["updates"], "compute": used / total if used is not None and total else None}


def per_seed_costs(rows: List[dict], gate: str) -> List[Optional[dict]]:
    """cost_to_reach_switch of each seed of `gate` against the same seed's Switch run."""
    switch = {r["seed"]: r for r in rows if r["gate"] == "switch" and r.get("final_valid_loss") is not None}
    return [cost_to_reach_switch(r, switch[r["seed"]]) for r in rows if r["gate"] == gate and r["seed"] in switch]


def verdict(rows: List[dict], gate: str) -> Optional[str]:
    """Whether `gate` meets the target on every seed, in plain words; None without Switch runs."""
    costs = per_seed_costs(rows, gate)
    if not costs:
        return None
    ok = [c is not None and c["updates"] <= TARGET_UPDATES and c["compute"] is not None and c["compute"] <= TARGET_COMPUTE
          for c in costs]
    reached = [c for c in costs if c is not None]
    if reached:
        detail = f"{statistics.mean(c['updates'] for c in reached):.2f} x Switch's updates"
        spent = [c["compute"] for c in reached if c["compute"] is not None]
        if spent:
            detail += f" and {statistics.mean(spent):.2f} x its expert compute (means over the seeds that reach it)"
    else:
        detail = "never reached"
    met = "meets" if all(ok) else ("meets on %d of %d seeds" % (sum(ok), len(ok)) if any(ok) else "does not meet")
    return (f"{gate} {met} the target (Switch's final valid loss in <= {TARGET_UPDATES} x its updates with <= "
            f"{TARGET_COMPUTE} x its expert compute): reached on {len(reached)}/{len(costs)} seeds, {detail}.")
