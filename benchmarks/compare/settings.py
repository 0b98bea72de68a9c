"""Settings recorded as JSON next to what they produced (prepared data, a run's result): reading
them back and describing how two differ, so that nothing is reused with other settings and the
output can say what changed."""

import json
from pathlib import Path
from typing import Any, List


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (treated as unknown settings)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def describe_changes(old: Any, new: dict, prefix: str = "") -> List[str]:
    """Human-readable differences between two settings dicts, e.g. ["updates 20 -> 200"]."""
    out = []
    old = old if isinstance(old, dict) else {}
    for k in list(new) + [k for k in old if k not in new]:
        o, n = old.get(k), new.get(k)
        if o == n:
            continue
        if isinstance(o, dict) and isinstance(n, dict):
            out += describe_changes(o, n, f"{prefix}{k}.")
        elif isinstance(o, (list, dict)) or isinstance(n, (list, dict)):
            out.append(f"{prefix}{k} changed")
        else:
            out.append(f"{prefix}{k} {o} -> {n}")
    return out
