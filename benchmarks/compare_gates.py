#!/usr/bin/env python3
"""The EvoMoE paper's comparison at small scale, on real data: every gate trained with the same
model, data, number of updates and seeds, then evaluated; writes a Markdown report with plots
(<work dir>/report.md and report_plots/, or wherever --results says; nothing goes into docs/ unless
--results names a file there).

Tasks
  lm   GPT-style MoE language model on WikiText-2 (sentencepiece 4k vocabulary); metric: validation
       perplexity (fairseq-eval-lm on the full valid split, per subword) at the final update
  mt   MoE transformer on Multi30k De->En (sentencepiece 4k joint vocabulary); metric: test BLEU
       (test_2016_flickr, beam 5, detokenised sacrebleu) at the final update

Gates come from configs/gate/<gate>.yaml (the same files fairseq-hydra-train uses), turned into
fairseq-train options; gate=evomoe also switches to the evomoe_* phase task.

For each task the report gives, per gate (mean +- std over seeds): the metric at equal updates,
the final validation loss, the updates needed to reach the Switch baseline's final validation loss
(linear interpolation between validations; per seed against that seed's Switch run), training
wall-clock, and the mean number of experts per token over training.

Default: 7 gates x 3 seeds x 2 tasks, tiny models, 200 updates of 1,536 tokens: about an hour on
a 2-core CPU with --jobs 2 (two runs at a time, 1 thread each).
Runs are resumable: a finished run (its result.json) is not trained again when it was made with the
same settings (everything these options feed into its data and training, and the fairseq-train
command itself less its checkpoint cadence, recorded in result.json). A run saves a checkpoint at
every validation; an unfinished (interrupted or crashed) run with the same settings resumes from
its last one and ends as it would have uninterrupted. A run made with other settings, or retrained
with --force, is moved aside to <work dir>/<task>/<gate>/seed<k>.previous-<time> and trained again,
as is an unfinished run without a checkpoint; the output says so. Prepared data
goes to <work dir>/data/<corpus>_spm<V>[_<N>l_<M>e] with its settings in settings.json; data prepared
with other settings is never reused (a new folder <name>-2, -3, ... is prepared instead).

  python benchmarks/compare_gates.py --jobs 2                         # the default comparison
  python benchmarks/compare_gates.py --tasks lm --gates switch,evomoe --seeds 1 --updates 20   # smoke
  python benchmarks/compare_gates.py --gpu --size small --updates 20000 --seeds 1,2,3       # bigger, GPU
  python benchmarks/compare_gates.py ... --report-only     # the same options: report the runs finished so far
"""

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))  # plot_routing
sys.path.insert(0, str(HERE))  # the compare package

from compare import cli  # noqa: E402
from compare.commands import log  # noqa: E402
from compare.data_cache import data_dirs, prepare_data  # noqa: E402
from compare.flags import train_command  # noqa: E402
from compare.pool import run_all  # noqa: E402
from compare.report import write_report  # noqa: E402
from compare.run_store import finished_result, run_dir, run_one  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The checked options, all paths absolute (see compare.cli); --help shows this file's docstring."""
    return cli.parse_args(argv, __doc__)


def thread_env(a: argparse.Namespace) -> Dict[str, str]:
    """The tools' environment; on CPU with several runs at a time, each run gets cores / --jobs
    threads unless --threads says otherwise (sets a.threads, which the report states)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    a.threads = a.threads or (0 if a.gpu or a.jobs == 1 else max(1, (os.cpu_count() or 1) // a.jobs))
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    return env


def main(argv: Optional[List[str]] = None) -> int:
    """Prepare the data, train and evaluate every (task, gate, seed) not done earlier with the same
    settings, write the report; 1 when a run failed. --dry-run prints the training commands only;
    --report-only writes the report from the finished runs alone."""
    a = parse_args(argv)
    given = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only"]  # the report names the comparison's command
    cmdline = "python benchmarks/compare_gates.py " + " ".join(shlex.quote(x) for x in given)
    env = thread_env(a)
    jobs = [(t, g, s) for s in a.seeds for t in a.tasks for g in a.gates]  # seed by seed: a stopped run leaves whole seeds
    if a.dry_run:
        data = data_dirs(a)
        for t, g, s in jobs:
            print(" ".join(shlex.quote(c) for c in train_command(a, t, g, s, data[t], run_dir(a, t, g, s))))
        return 0
    if a.report_only:
        data = data_dirs(a)
        found = {job: finished_result(a, *job, data[job[0]]) for job in jobs}
        missing = [f"{t} {g} seed {s}" for (t, g, s), r in found.items() if r is None]
        report = write_report(a, [r for r in found.values() if r is not None], cmdline, missing)
        log(f"report: {report} ({len(jobs) - len(missing)} of {len(jobs)} runs finished"
            + (f"; not yet: {', '.join(missing)})" if missing else ")"))
        return 0
    a.work_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(a, env)
    results, failed = run_all(jobs, lambda i, t, g, s: run_one(a, t, g, s, data[t], env, i, len(jobs)), a.jobs)
    report = write_report(a, results, cmdline)
    log(f"report: {report}")
    log(f"runs, logs and checkpoints: {a.work_dir}")
    if failed:
        log(f"failed runs: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
