"""The comparison's command-line options, checked, with every path made absolute: the tools run in
the repository root, not in the caller's folder, so relative paths are resolved here first."""

import argparse
import os
from pathlib import Path
from typing import List, Optional

from . import REPO
from .flags import ALL_GATES, DEFAULT_GATES, SIZES, TASKS, config_path


def build_parser(description: str) -> argparse.ArgumentParser:
    """The option parser; `description` is the --help text above the options."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="lm,mt", help="comma-separated: lm, mt (default: both)")
    p.add_argument("--gates", default=",".join(DEFAULT_GATES), help=f"comma-separated, from {','.join(ALL_GATES)} "
                   f"(default: {','.join(DEFAULT_GATES)})")
    p.add_argument("--gate-dir", default=None, help="a folder of further gate configs (<name>.yaml, as configs/gate/; "
                   "`defaults` may name configs/gate files, e.g. a variant of evomoe), usable in --gates")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--updates", type=int, default=200, help="training updates per run (default 200)")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model size (default tiny)")
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer (default 4)")
    p.add_argument("--max-tokens", type=int, default=1536, help="tokens per update (default 1536)")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="LM block length (default 128)")
    p.add_argument("--lr", type=float, default=0.002, help="peak learning rate (default 0.002)")
    p.add_argument("--balance-wt", type=float, default=0.01, help="balance-loss weight for every gate (default 0.01)")
    p.add_argument("--validations", type=int, default=6, help="validations per run (default 6)")
    p.add_argument("--max-valid-steps", type=int, default=10, help="batches per intermediate validation (default 10)")
    p.add_argument("--spawn-mode", default=None, choices=["mask", "reinit", "noise", "copy"],
                   help="EvoMoE spawn mode of every EvoMoE gate (default: each gate config's; gate=evomoe: mask)")
    p.add_argument("--tau-schedule", default=None, choices=["linear", "exponential", "cosine"],
                   help="EvoMoE temperature schedule of every EvoMoE gate (default: each gate config's; gate=evomoe: linear)")
    p.add_argument("--spm-vocab", type=int, default=4000, help="sentencepiece vocabulary of both corpora (default 4000)")
    p.add_argument("--train-lines", type=int, default=0, help="use only the first N training lines/pairs of each "
                   "corpus (smoke tests; default: all)")
    p.add_argument("--eval-lines", type=int, default=200, help="with --train-lines: valid/test lines kept (default 200)")
    p.add_argument("--data-dir", default=None, help="shipped corpora (default: $EVOMOE_DATA or ../shared/data "
                   "when present)")
    p.add_argument("--work-dir", default="runs/compare_gates", help="runs, checkpoints, logs (default runs/compare_gates)")
    p.add_argument("--results", default=None, help="Markdown report (default <work dir>/report.md; the "
                   "hand-written docs/results.md is written only when named here); plots go to <results stem>_plots/ "
                   "next to it")
    p.add_argument("--note", default="", help="a remark printed at the top of the report")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (default 1); on CPU each "
                   "gets cores / jobs threads unless --threads is given; each run records this sharing with its "
                   "wall-clock, and the report states it")
    p.add_argument("--threads", type=int, default=0, help="torch/OMP threads per run (default: all cores / --jobs)")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (default: CPU)")
    p.add_argument("--force", action="store_true", help="retrain runs that already have a result (the earlier run is "
                   "moved to seed<k>.previous-<time>, not deleted)")
    p.add_argument("--dry-run", action="store_true", help="print the training commands and exit")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs already finished "
                   "with these settings and name the others; trains, evaluates and moves nothing (while a "
                   "comparison is still running, or to read a partly finished run store)")
    return p


def parse_args(argv: Optional[List[str]], description: str) -> argparse.Namespace:
    """Parsed options: comma-separated lists split (seeds as ints), values checked (an error names
    the option), --data-dir defaulted to $EVOMOE_DATA or ../shared/data, --results to
    <work dir>/report.md, and all paths absolute."""
    p = build_parser(description)
    a = p.parse_args(argv)
    a.tasks = [t for t in a.tasks.split(",") if t]
    a.gates = [g for g in a.gates.split(",") if g]
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    for t in a.tasks:
        if t not in TASKS:
            p.error(f"--tasks: unknown task {t!r}; choose from lm, mt")
    if a.gate_dir:
        if not Path(a.gate_dir).is_dir():
            p.error(f"--gate-dir {a.gate_dir} is not a folder")
        a.gate_dir = Path(a.gate_dir).resolve()
    for g in a.gates:
        if g not in ALL_GATES and config_path("gate", g, a.gate_dir) is None:
            p.error(f"--gates: unknown gate {g!r}; choose from {', '.join(ALL_GATES)}"
                    f"{f' or a config in {a.gate_dir}' if a.gate_dir else ''}")
    if not a.tasks or not a.gates or not a.seeds:
        p.error("--tasks, --gates and --seeds must each name at least one value")
    for name, values in (("--tasks", a.tasks), ("--gates", a.gates), ("--seeds", a.seeds)):
        twice = sorted({v for v in values if values.count(v) > 1}, key=str)
        if twice:
            p.error(f"{name} names {', '.join(map(str, twice))} more than once (each run is trained and counted once)")
    if a.updates < 10:
        p.error(f"--updates must be at least 10, got {a.updates}")
    for name, value in (("--experts", a.experts), ("--max-tokens", a.max_tokens), ("--tokens-per-sample", a.tokens_per_sample),
                        ("--spm-vocab", a.spm_vocab)):
        if value < 1:
            p.error(f"{name} must be >= 1, got {value}" + (" (the harness tokenizes with sentencepiece)" if name == "--spm-vocab" else ""))
    if not (0 < a.lr < float("inf")):
        p.error(f"--lr must be a positive number, got {a.lr}")
    if not (0 <= a.balance_wt < float("inf")):
        p.error(f"--balance-wt must be a number >= 0, got {a.balance_wt}")
    if a.threads < 0 or a.train_lines < 0:
        p.error("--threads and --train-lines must be >= 0 (0: all cores / all lines)")
    if a.train_lines and a.eval_lines < 1:
        p.error(f"--eval-lines must be >= 1 with --train-lines, got {a.eval_lines}")
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.validations < 1 or a.max_valid_steps < 1:
        p.error("--validations and --max-valid-steps must be >= 1")
    if a.data_dir:
        if not Path(a.data_dir).is_dir():
            p.error(f"--data-dir {a.data_dir} is not a folder (it should hold wikitext-2/ and multi30k/)")
        a.data_dir = Path(a.data_dir).resolve()
    else:
        default = os.environ.get("EVOMOE_DATA") or str(REPO.parent / "shared" / "data")
        a.data_dir = Path(default).resolve() if Path(default).is_dir() else None
    a.work_dir = Path(a.work_dir).resolve()
    a.results = str(Path(a.results).resolve() if a.results else a.work_dir / "report.md")
    return a
