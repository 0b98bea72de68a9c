"""What each section of benchmarks/device_check.sh must show in its log to pass, and the key
numbers it reports: one function per kind of section, each taking the section's log file(s) and
returning an Outcome (pass or fail, and markdown lines for the report)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

from logs import (bench_rows, last_error, median_wps, params_of, phases_and_losses, pytest_call_seconds,
                  pytest_counts, pytest_outcomes, train_records)

ALL_PHASES = [0, 1, 2]  # expert-diversify, dense-to-sparse (soft), top-1 (hard)


@dataclass
class Outcome:
    ok: bool
    lines: List[str] = field(default_factory=list)


def read(path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def pytest_run(logs: List[str]) -> Outcome:
    """A pytest run: passes when pytest reports tests passed and none failed or errored."""
    text = read(logs[0])
    counts = pytest_counts(text)
    failed = [t for t, o in pytest_outcomes(text).items() if o in ("FAILED", "ERROR")]
    ok = counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary line"
    return Outcome(ok, [f"- pytest: {summary}"] + [f"- failed: `{t}`" for t in failed])


def sync_table(logs: List[str]) -> Outcome:
    """tests/test_sync_free.py's CUDA test under `-rA --durations=0`: a table of case x dtype, each
    cell the outcome and the test's call time (warm-up step, synchronize, checked step)."""
    text = read(logs[0])
    outcomes, seconds = pytest_outcomes(text), pytest_call_seconds(text)
    cells: Dict[str, Dict[str, str]] = {}
    dtypes: List[str] = []
    for test_id, outcome in outcomes.items():
        params = params_of(test_id)
        case, dtype = params if len(params) == 2 else (test_id, "")
        dtypes += [dtype] if dtype not in dtypes else []
        took = f" ({1000 * seconds[test_id]:.0f} ms)" if test_id in seconds else ""
        cells.setdefault(case, {})[dtype] = ("no host sync" if outcome == "PASSED" else outcome) + took
    ok = bool(outcomes) and all(o == "PASSED" for o in outcomes.values())
    lines = pytest_run(logs).lines[:1] + [f"- {sum(o == 'PASSED' for o in outcomes.values())} of {len(outcomes)} gate x dtype cases ran a "
             "training step (capacity factor 1.25, padded token ids) without a host synchronisation"]
    if cells:
        lines += ["", "| case | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
        lines += [f"| {case} | " + " | ".join(row.get(d, "not run") for d in dtypes) + " |" for case, row in cells.items()]
    return Outcome(ok, lines)


def every_phase(logs: List[str]) -> Outcome:
    """An EvoMoE fairseq-train run: passes when its log shows phases 0, 1 and 2 and only finite losses."""
    info = phases_and_losses(train_records(logs[0]))
    overflows = read(logs[0]).count("gradient overflow detected")
    ok = info["phases"] == ALL_PHASES and info["finite"]
    losses = info["losses"]
    lines = [f"- phases logged: {info['phases']} (want {ALL_PHASES}); {len(losses)} logged intervals, "
             f"last update {info['updates']}",
             f"- loss: first {losses[0]:.3f}, last {losses[-1]:.3f}; all finite: {info['finite']}" if losses
             else "- no loss logged",
             f"- steps skipped on a gradient overflow (fp16 loss scaling): {overflows}"]
    return Outcome(ok, lines)


def expert_parallel(logs: List[str]) -> Outcome:
    """The two-worker run: every phase as above, and fairseq's second worker started."""
    text = read(logs[0])
    phases = every_phase(logs)
    started = "distributed init (rank 1)" in text
    return Outcome(phases.ok and started, [f"- second worker started (`distributed init (rank 1)`): {started}"] + phases.lines)


def layer_bench(logs: List[str]) -> Outcome:
    """benchmarks/bench_moe_layer.py: the MoE layer over the dense FFN of equal active FLOPs."""
    rows = bench_rows(read(logs[0]))
    lines = ["", "| E | tokens | MoE throughput / dense | MoE step time / dense |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['experts']} | {r['tokens']} | {r['moe_over_dense']:.2f}x | {1 / r['moe_over_dense']:.2f}x |"
              for r in rows if r["moe_over_dense"] > 0]
    return Outcome(bool(rows), lines if rows else ["- no benchmark table in the log"])


def words_per_second(logs: List[str]) -> Outcome:
    """One fairseq-train run: the median of its logged words per second after the first interval."""
    records = train_records(logs[0])
    wps = median_wps(records)
    info = phases_and_losses(records)
    ok = wps is not None and info["finite"]
    return Outcome(ok, [f"- words/s: median {wps:,.0f} over {len(records) - 1} logged intervals after the first"
                        if wps is not None else "- no words/s logged after the first interval",
                        f"- last update {info['updates']}, losses finite: {info['finite']}"])


def wps_ratio(logs: List[str]) -> Outcome:
    """Two runs, dense then MoE: the MoE model's median words per second over the dense model's."""
    dense, moe = (median_wps(train_records(p)) for p in logs)
    if dense is None or moe is None:
        return Outcome(False, ["- a words/s figure is missing (see the two runs above)"])
    return Outcome(True, [f"- words/s MoE / dense: **{moe / dense:.2f}x** ({moe:,.0f} / {dense:,.0f})"])


def prepared_data(logs: List[str]) -> Outcome:
    """scripts/prepare_wikitext.sh: passes when it reports the binarized vocabulary."""
    found = [line.strip() for line in read(logs[0]).splitlines() if line.strip().startswith(("binary data", "vocabulary"))]
    return Outcome(len(found) == 2, [f"- {line}" for line in found] or ["- the script did not report its output"])


KINDS: Dict[str, Callable[[List[str]], Outcome]] = {
    "pytest": pytest_run, "sync": sync_table, "phases": every_phase, "expert_parallel": expert_parallel,
    "bench": layer_bench, "wps": words_per_second, "wps_ratio": wps_ratio,
    "data": prepared_data,
}
