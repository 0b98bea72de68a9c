#!/usr/bin/env python3
"""The diagnosis study's router table: per run of a store, the router statistics of its training log
by phase, kept next to its result as router.json (the training logs themselves are not committed);
then, per gate, the mean +- std over seeds of those statistics beside the run's result.

    python benchmarks/diagnosis/summarize.py [--store benchmarks/diagnosis/runs] [--task lm] [--seeds 4,5,6] [--out FILE]

Per phase (EvoMoE: 1 soft, 2 hard; other gates: all lines), from the training log lines:
  logit_std   moe_router_logit_std, mean over the phase's lines (nats; Gumbel noise's std is 1.28)
  top_gap     moe_router_top_gap, the same
  agree       moe_hard_eval_agree_pct, hard phase: % of tokens trained on the expert evaluation picks
Beside them, from result.json: validation perplexity (lm) or test BLEU (mt), final validation loss
and whole-run expert compute; for lm also the test perplexity where evaluate_test.py wrote test.json. A run without a training log keeps the router.json it has (none for runs older than the
statistics)."""

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "scripts"))  # plot_routing

STATS = {"logit_std": "moe_router_logit_std", "top_gap": "moe_router_top_gap", "agree": "moe_hard_eval_agree_pct"}


def router_stats(train_log: Path) -> dict:
    """{phase: {stat: mean over the phase's training lines}} ("all" for lines without moe_phase)."""
    from plot_routing import parse_log

    by_phase: dict = {}
    for rec in parse_log(train_log)["train"]:
        phase = str(int(rec["moe_phase"])) if rec.get("moe_phase") is not None else "all"
        for name, key in STATS.items():
            if rec.get(key) is not None:
                by_phase.setdefault(phase, {}).setdefault(name, []).append(rec[key])
    return {p: {n: statistics.mean(v) for n, v in stats.items()} for p, stats in sorted(by_phase.items())}


def collect(store: Path, task: str, seeds=None) -> dict:
    """{gate: [per-seed rows]} of the given seeds (None: all); writes router.json next to every
    result.json with a training log."""
    rows: dict = {}
    for result_file in sorted((store / task).glob("*/seed*/result.json")):
        run = result_file.parent
        number = run.name[len("seed"):]
        if not number.isdigit():  # a run moved aside (seed<k>.previous-<time>)
            continue
        if seeds is not None and int(number) not in seeds:
            continue
        if (run / "train.log").is_file():
            (run / "router.json").write_text(json.dumps(router_stats(run / "train.log"), indent=1) + "\n")
        router = json.loads((run / "router.json").read_text()) if (run / "router.json").is_file() else {}
        result = json.loads(result_file.read_text())
        test = json.loads((run / "test.json").read_text()) if (run / "test.json").is_file() else {}
        curve = result.get("train_curve") or {}
        compute = (curve.get("moe_expert_compute") or [None])[-1]
        rows.setdefault(run.parent.name, []).append({
            "seed": result["seed"], "metric": result.get("ppl" if task == "lm" else "bleu"), "test_ppl": test.get("ppl"),
            "final_valid_loss": result.get("final_valid_loss"),
            "expert_compute_m": compute / 1e6 if compute else None, "router": router})
    return rows


def mean_std(values, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def phases(router: dict, gate: str) -> tuple:
    """(soft-phase stats, hard-phase stats) of an EvoMoE run; (None, whole-run stats) of another gate
    whose lines all log one phase; (None, None) of one that logs stages under the same key
    (StableMoE), whose per-stage means cannot be pooled into a whole run's here."""
    if gate.startswith("evomoe"):
        return router.get("1"), router.get("2")
    if len(router) > 1:
        return None, None
    return None, router.get("1") or router.get("all")


def table(rows: dict, task: str = "lm") -> str:
    metric = "valid ppl | test ppl" if task == "lm" else "test BLEU"
    head = (f"| gate | seeds | {metric} | final valid loss | expert compute (M) | logit std, soft | top gap, soft | "
            "logit std, hard (others: whole run) | top gap, hard (others) | hard: tokens trained on the eval expert (%) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for gate, runs in rows.items():
        def stat(which, name):
            return mean_std([(phases(r["router"], gate)[which] or {}).get(name) for r in runs])
        metric = mean_std([r["metric"] for r in runs], 2)
        if task == "lm":
            metric += f" | {mean_std([r['test_ppl'] for r in runs], 2)}"
        out.append(f"| {gate} | {', '.join(str(r['seed']) for r in runs)} | {metric} | "
                   f"{mean_std([r['final_valid_loss'] for r in runs])} | {mean_std([r['expert_compute_m'] for r in runs])} | "
                   f"{stat(0, 'logit_std')} | {stat(0, 'top_gap')} | {stat(1, 'logit_std')} | {stat(1, 'top_gap')} | "
                   f"{stat(1, 'agree')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=str(HERE / "runs"), help="the run store (default benchmarks/diagnosis/runs)")
    p.add_argument("--task", default="lm", choices=["lm", "mt"], help="task folder of the store (default lm)")
    p.add_argument("--seeds", default=None, help="only these seeds, comma-separated (default: every seed)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args(argv)
    try:
        seeds = None if a.seeds is None else {int(x) for x in a.seeds.split(",")}
    except ValueError:
        p.error(f"--seeds takes seed numbers separated by commas, e.g. 4,5,6; got {a.seeds!r}")
    text = table(collect(Path(a.store), a.task, seeds), a.task)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
