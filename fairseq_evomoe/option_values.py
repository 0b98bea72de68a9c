"""A check every option validator shares: numbers that must be finite (argparse's float() takes
'nan' and 'inf', which pass range checks such as `x < 0` and fail, or train nonsense, later)."""

import math
from typing import Dict


def require_finite(values: Dict[str, float]) -> None:
    """ValueError naming the first option (e.g. "--moe-capacity-factor") whose value is NaN or infinite."""
    for flag, value in values.items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
