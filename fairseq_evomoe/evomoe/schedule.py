"""EvoMoE's schedule as pure functions of fairseq's update counter.

    updates:  0 ........ T_div ................................ H ..................
    phase:    diversify  | gate-sparsify, soft (DTS, tau anneals) | gate-sparsify, hard (top-1)
    tau:      tau_max    | tau(t), t = num_updates - T_div, over D updates -> tau_min
    k:        k_start    | k(t), the same shape, over D updates -> 1  (--dts-sparsity scheduled)

Everything is derived from `num_updates`, so a run resumed from any checkpoint is in exactly the
phase and temperature it would have had without the interruption.
"""

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

from ..option_values import require_finite

TAU_SCHEDULES = ("linear", "exponential", "cosine")


class Phase(IntEnum):
    DIVERSIFY = 0  # one base expert, run as a dense FFN
    SOFT = 1  # dense-to-sparse routing: every expert whose Gumbel-softmax weight passes the threshold
    HARD = 2  # top-1 routing


def anneal(t: int, start: float, end: float, anneal_updates: int, kind: str = "linear") -> float:
    """A value going from `start` to `end` (end <= start) over `anneal_updates`, `t` updates into
    the gate-sparsify phase (t < 0 counts as 0), linearly, exponentially or along a half cosine."""
    t = max(t, 0)
    frac = min(t / anneal_updates, 1.0)
    if kind == "linear":
        value = start - frac * (start - end)
    elif kind == "exponential":
        value = start * (end / start) ** frac
    elif kind == "cosine":
        value = end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * frac))
    else:
        raise ValueError(f"--dts-tau-schedule {kind!r} is not valid; choose one of: {', '.join(TAU_SCHEDULES)}")
    return max(value, end)


def temperature(t: int, tau_max: float, tau_min: float, anneal_updates: int, kind: str = "linear") -> float:
    """The gate temperature `t` updates into the gate-sparsify phase."""
    return anneal(t, tau_max, tau_min, anneal_updates, kind)


def resolve_updates(value: Optional[float], max_update: int, option: str) -> Optional[int]:
    """An update count given as a count (>= 1) or as a fraction of --max-update (0 < value < 1)."""
    if value is None:
        return None
    require_finite({option: value})
    if value < 0:
        raise ValueError(f"{option} must be >= 0 (an update count, or a fraction of --max-update below 1), got {value}")
    if 0 < value < 1:
        if not max_update:
            raise ValueError(f"{option} {value} is a fraction of --max-update, so --max-update must be set (> 0)")
        return max(1, int(round(value * max_update)))
    if value != int(value):
        raise ValueError(f"{option} must be a whole number of updates or a fraction below 1, got {value}")
    return int(value)


@dataclass(frozen=True)
class EvoMoESchedule:
    diversify_updates: int = 0  # T_div
    anneal_updates: int = 5000  # D
    hard_update: Optional[int] = None  # H; None = never switches to top-1
    tau_max: float = 2.0
    tau_min: float = 0.5
    tau_schedule: str = "linear"

    def phase(self, num_updates: int) -> Phase:
        if num_updates < self.diversify_updates:
            return Phase.DIVERSIFY
        if self.hard_update is not None and num_updates >= self.hard_update:
            return Phase.HARD
        return Phase.SOFT

    def tau(self, num_updates: int) -> float:
        return temperature(
            num_updates - self.diversify_updates, self.tau_max, self.tau_min, self.anneal_updates, self.tau_schedule
        )

    def experts_per_token(self, num_updates: int, k_start: float) -> float:
        """k(t): the mean number of experts per token that scheduled sparsity targets, from
        `k_start` at the spawn down to 1 over the D anneal updates, in the temperature's shape."""
        return anneal(num_updates - self.diversify_updates, k_start, 1.0, self.anneal_updates, self.tau_schedule)

    @classmethod
    def from_args(cls, args) -> "EvoMoESchedule":
        """Build and validate the schedule from the model options (see evomoe/options.py)."""
        max_update = getattr(args, "max_update", 0) or 0
        t_div = resolve_updates(getattr(args, "evomoe_diversify_updates", 0) or 0, max_update, "--evomoe-diversify-updates")
        anneal = resolve_updates(args.dts_anneal_updates, max_update, "--dts-anneal-updates")
        hard = resolve_updates(args.dts_hard_update, max_update, "--dts-hard-update")
        if hard is None:
            hard = t_div + anneal  # default: top-1 as soon as the temperature reaches tau_min
        schedule = cls(t_div, anneal, hard, args.dts_tau_max, args.dts_tau_min, args.dts_tau_schedule)
        # fine-tuning a spawned checkpoint (models/model_checks.py): the schedule is past the spawn for
        # good, and the checkpoint's own counts replace these when it loads (saved_schedule.py), so
        # counts that fractions of a short fine-tune's --max-update put in one update are no error
        spawned = getattr(args, "evomoe_restores_spawned_experts", False)
        schedule.validate(0 if spawned else max_update,
                          allow_hard_start=spawned or getattr(args, "dts_allow_hard_start", False))
        return schedule

    def validate(self, max_update: int = 0, allow_hard_start: bool = False) -> None:
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"--dts-tau-schedule {self.tau_schedule!r} is not valid; choose one of: {', '.join(TAU_SCHEDULES)}")
        require_finite({"--dts-tau-max": self.tau_max, "--dts-tau-min": self.tau_min, "--dts-anneal-updates": self.anneal_updates})
        if self.anneal_updates <= 0:
            raise ValueError(f"--dts-anneal-updates (D) must be > 0, got {self.anneal_updates}")
        if self.tau_min <= 0:
            raise ValueError(f"--dts-tau-min must be > 0, got {self.tau_min}")
        if self.tau_min > self.tau_max:
            raise ValueError(f"--dts-tau-min ({self.tau_min}) must not exceed --dts-tau-max ({self.tau_max})")
        if max_update and self.diversify_updates >= max_update:
            raise ValueError(
                f"--evomoe-diversify-updates ({self.diversify_updates}) must be below --max-update ({max_update}): "
                "the experts would never be spawned"
            )
        if self.hard_update is not None and self.hard_update <= self.diversify_updates and not allow_hard_start:
            raise ValueError(
                f"--dts-hard-update ({self.hard_update}) is not after the expert spawn at update {self.diversify_updates}: "
                "the gate would be top-1 from the start; set a later --dts-hard-update or pass --dts-allow-hard-start"
            )
