"""The device check's markdown report, written as the check goes, so that a run killed midway
leaves every section it finished (and the command of the one it was in).

    python benchmarks/device_check/report.py header  --out R.md
    python benchmarks/device_check/report.py start   --out R.md --title T --command CMD --limit 60
    python benchmarks/device_check/report.py finish  --out R.md --title T --kind K --log L [--log L2] --rc 0 --seconds 12.3
    python benchmarks/device_check/report.py skip    --out R.md --title T --text REASON
    python benchmarks/device_check/report.py note    --out R.md --text TEXT
    python benchmarks/device_check/report.py summary --out R.md

`finish` judges the section with checks.KINDS[K] on its log(s), appends status, time and key
numbers (and the log's tail on failure), records the status in R.md.status.tsv, and exits 1 when the
section failed. `summary` appends the table of every section's status from that file."""

import argparse
import csv
import datetime
import platform
import sys
from pathlib import Path

from checks import KINDS, Outcome, read

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from code_version import commit  # noqa: E402

TAIL_LINES = 25


def status_file(out: Path) -> Path:
    return out.with_name(out.name + ".status.tsv")


def append(out: Path, *lines: str) -> None:
    with open(out, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def machine() -> str:
    """GPU, torch, CUDA, numpy and fairseq versions (the CPU's name where there is no GPU)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import torch

    def fairseq_version():
        for dist in ("fairseq-fixed", "fairseq"):
            try:
                return f"{dist} {version(dist)}"
            except PackageNotFoundError:
                continue
        return "fairseq (version unknown)"

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"no CUDA GPU ({platform.processor() or 'CPU'})"
    return (f"{where}; torch {torch.__version__}, CUDA {torch.version.cuda}, numpy {numpy.__version__}, "
            f"{fairseq_version()}; Python {platform.python_version()}")


def header(out: Path, argv: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("", encoding="utf-8")
    status_file(out).write_text("", encoding="utf-8")
    repo = Path(__file__).resolve().parents[2]
    append(out, "# Device check", "",
           f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
           f"- machine: {machine()}",
           f"- commit: {commit(repo)}",
           f"- command: `{' '.join(['bash benchmarks/device_check.sh', argv]).strip()}`", "")


def start(out: Path, title: str, command: str, limit: int) -> None:
    append(out, f"## {title}", "", "```", command, "```", "",
           f"Time limit {limit} s. (A report that ends here was cut off while this section ran.)", "")


def finish(out: Path, title: str, outcome: Outcome, rc: int, seconds: float, logs) -> bool:
    ok = outcome.ok and rc == 0
    if rc == 124:
        why = f"timed out (exit {rc})"
    else:
        why = f"exit {rc}" + ("" if outcome.ok else ", its log does not show what the section checks")
    append(out, f"**{'PASS' if ok else 'FAIL'}** in {seconds:.1f} s" + ("" if ok else f": {why}") + f"; log `{logs[0]}`", "",
           *outcome.lines, "")
    if not ok and Path(logs[0]).is_file():
        tail = read(logs[0]).splitlines()[-TAIL_LINES:]
        append(out, f"Last {len(tail)} lines of the log:", "", "```", *tail, "```", "")
    record(out, title, ok, seconds)
    return ok


def record(out: Path, title: str, ok: bool, seconds: float) -> None:
    with open(status_file(out), "a", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerow([title, "PASS" if ok else "FAIL", f"{seconds:.1f}"])


def skip(out: Path, title: str, reason: str) -> None:
    """A section that did not run: it counts as failed."""
    append(out, f"## {title}", "", f"**FAIL**: not run, {reason}", "")
    record(out, title, False, 0.0)


def note(out: Path, text: str) -> None:
    append(out, text, "")


def summary(out: Path) -> bool:
    """Appends the status table; True when every section passed (and there was one)."""
    with open(status_file(out), encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r]
    total = sum(float(r[2]) for r in rows)
    append(out, "## Summary", "", "| section | status | seconds |", "|---|---|---:|",
           *(f"| {t} | {s} | {float(sec):.1f} |" for t, s, sec in rows), f"| total | | {total:.1f} |", "")
    failed = [t for t, s, _ in rows if s != "PASS"]
    append(out, f"{len(failed)} of {len(rows)} sections failed: {', '.join(failed)}." if failed
           else f"All {len(rows)} sections passed.", "")
    return bool(rows) and not failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["header", "start", "finish", "skip", "note", "summary"])
    p.add_argument("--out", type=Path, required=True, help="the markdown report")
    p.add_argument("--title", default="", help="start, finish: the section's title")
    p.add_argument("--command", default="", help="start: the section's command line")
    p.add_argument("--limit", type=int, default=0, help="start: the section's time limit in seconds")
    p.add_argument("--kind", choices=sorted(KINDS), help="finish: what the section's log must show (checks.py)")
    p.add_argument("--log", action="append", default=[], help="finish: the section's log file(s)")
    p.add_argument("--rc", type=int, default=0, help="finish: the section's exit status (124: timed out)")
    p.add_argument("--seconds", type=float, default=0.0, help="finish: how long the section ran")
    p.add_argument("--text", default="", help="note: a line to append; skip: why the section did not run")
    p.add_argument("--argv", default="", help="header: the device check's own options, for the record")
    a = p.parse_args(argv)
    if a.action == "header":
        header(a.out, a.argv)
    elif a.action == "start":
        start(a.out, a.title, a.command, a.limit)
    elif a.action == "skip":
        skip(a.out, a.title, a.text)
    elif a.action == "note":
        note(a.out, a.text)
    elif a.action == "summary":
        return 0 if summary(a.out) else 1
    else:
        if a.kind is None or not a.log:
            p.error("finish needs --kind and at least one --log")
        missing = [log for log in a.log if not Path(log).is_file()]
        outcome = Outcome(False, [f"- no log file: `{log}`" for log in missing]) if missing else KINDS[a.kind](a.log)
        return 0 if finish(a.out, a.title, outcome, a.rc, a.seconds, a.log) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
