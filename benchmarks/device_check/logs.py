"""Reading the logs the device check writes: fairseq-train's JSON lines (through
scripts/plot_routing.py's parser), pytest's summary and per-test lines, and the table that
benchmarks/bench_moe_layer.py prints. Pure text parsing, so all of it runs (and is tested) on CPU."""

import math
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from plot_routing import parse_log  # noqa: E402

PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")
PYTEST_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::\S+)")
PYTEST_DURATION = re.compile(r"^([0-9.]+)s (setup|call|teardown)\s+(\S+::\S+)")


def train_records(path) -> List[dict]:
    """fairseq-train's `train_inner` records (`--log-format json`), values as floats (inf and nan
    included; None where a value is not a number)."""
    return parse_log(path)["train"]


def phases_and_losses(records: List[dict]) -> dict:
    """The EvoMoE phases the records show (`moe_phase`), their losses, and whether every loss is finite."""
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    phases = sorted({int(r["moe_phase"]) for r in records if r.get("moe_phase") is not None and r["moe_phase"].is_integer()})
    last = int(records[-1]["num_updates"]) if records else 0
    return {"phases": phases, "losses": losses, "finite": bool(losses) and all(math.isfinite(v) for v in losses),
            "updates": last}


def median_wps(records: List[dict], skip: int = 1) -> Optional[float]:
    """Median of the logged words per second, leaving out the first `skip` intervals (CUDA and
    allocator warm-up); None when nothing is left."""
    wps = [r["wps"] for r in records[skip:] if r.get("wps") is not None]
    return statistics.median(wps) if wps else None


def pytest_counts(text: str) -> Dict[str, int]:
    """Counts of pytest's last summary line ("3 passed, 1 skipped in 2.1s"); errors as `error`."""
    for line in reversed(text.splitlines()):
        found = PYTEST_COUNT.findall(line)
        if found and " in " in line:
            return {("error" if k.startswith("error") else k): int(n) for n, k in found}
    return {}


def pytest_outcomes(text: str) -> Dict[str, str]:
    """{test id: PASSED/FAILED/...} from the short summary that `-rA` prints."""
    out = {}
    for line in text.splitlines():
        m = PYTEST_OUTCOME.match(line)
        if m:
            out[m.group(2)] = m.group(1)
    return out


def pytest_call_seconds(text: str) -> Dict[str, float]:
    """{test id: seconds of its call phase} from `--durations=0`."""
    return {m.group(3): float(m.group(1)) for m in map(PYTEST_DURATION.match, text.splitlines()) if m and m.group(2) == "call"}


def params_of(test_id: str) -> List[str]:
    """The parameter ids of a parametrized test id: `f.py::t[top1-bf16]` -> ['top1', 'bf16']
    (pytest joins them with '-'; a case whose own id has a '-' is rejoined from the left)."""
    inside = test_id[test_id.index("[") + 1: -1] if test_id.endswith("]") else ""
    parts = inside.split("-") if inside else []
    return ["-".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts


def bench_rows(text: str) -> List[dict]:
    """The rows of benchmarks/bench_moe_layer.py's table: experts, tokens, and the index MoE's
    throughput over the dense FFN's (its "index / dense" column)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].isdigit() and cells[5].endswith("x"):
            rows.append({"experts": int(cells[0]), "tokens": int(cells[1]), "moe_over_dense": float(cells[5][:-1])})
    return rows


def last_error(text: str) -> str:
    """The last line that names an error (for a one-line reason), or the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line
    return lines[-1] if lines else ""
