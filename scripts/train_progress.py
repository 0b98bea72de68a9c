#!/usr/bin/env python3
"""Turn fairseq-train's JSON output (read on stdin) into a progress bar plus the lines that matter.

    fairseq-train ... --log-format json 2>&1 | tee train.out | python scripts/train_progress.py --total 400

The bar shows update / total, loss, and for MoE runs the EvoMoE phase, temperature and mean experts
per token; validation results, EvoMoE phase changes and errors are printed as separate lines."""

import argparse
import json
import sys

from tqdm import tqdm

PHASE = {0: "diversify", 1: "dense-to-sparse", 2: "top-1"}


def fmt(rec, keys):
    parts = []
    for k, label in keys:
        if k in rec:
            parts.append(f"{label} {rec[k]}")
    return ", ".join(parts)


def updates_of(rec):
    """The update count a fairseq JSON record reports: train_inner lines log num_updates, epoch
    summaries train_num_updates, validations valid_num_updates (None for other records)."""
    for k in ("num_updates", "train_num_updates", "valid_num_updates"):
        if k in rec:
            try:
                return int(float(rec[k]))
            except (TypeError, ValueError):
                return None
    return None


def follow(lines, total, err=sys.stderr):
    """Show the progress of fairseq-train's output `lines`; returns (last update seen, finished),
    finished being True once fairseq printed its "done training" line."""
    bar = tqdm(total=total, desc="training", unit="upd", file=err, dynamic_ncols=True)
    done = 0
    finished = False
    tail = []
    for line in lines:
        tail = (tail + [line])[-30:]
        i = line.find("{")
        rec = None
        if i >= 0:
            try:
                rec = json.loads(line[i:])
            except ValueError:
                rec = None
        if isinstance(rec, dict):
            # progress from every record that carries an update count: train_inner lines come only
            # every --log-interval updates, epoch summaries and validations also at the end
            n = updates_of(rec)
            if n is not None and n > done:
                bar.update(n - done)
                done = n
        if isinstance(rec, dict) and "num_updates" in rec and "loss" in rec:
            post = {"loss": rec.get("inner_loss", rec["loss"])}
            if "moe_phase" in rec:
                post["phase"] = PHASE.get(int(round(float(rec["moe_phase"]))), rec["moe_phase"])
            if "moe_temperature" in rec:
                post["tau"] = rec["moe_temperature"]
            if "moe_experts_per_token" in rec:
                post["experts/token"] = rec["moe_experts_per_token"]
            bar.set_postfix(post, refresh=True)
        elif isinstance(rec, dict) and "valid_loss" in rec:
            bar.write("  validation at update {}: {}".format(
                rec.get("valid_num_updates", "?"),
                fmt(rec, [("valid_inner_loss", "loss"), ("valid_ppl", "ppl"), ("valid_moe_experts_per_token", "experts/token")]),
            ), file=err)
        elif "EvoMoE phase" in line or "EvoMoE:" in line or "Traceback" in line or "Error" in line or "done training" in line:
            bar.write("  " + line.rstrip().split(" | ")[-1], file=err)
            if "done training" in line:
                finished = True
    bar.close()
    if finished:
        if done < total:  # e.g. --max-epoch ended the run first: finished, not stopped
            err.write("training finished at update %d of the %d planned\n" % (done, total))
    elif done < total:
        err.write("training stopped at update %d of %d; last output:\n%s" % (done, total, "".join(tail)))
    return done, finished


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--total", type=int, required=True, help="--max-update of the run")
    a = p.parse_args()
    follow(sys.stdin, a.total)


if __name__ == "__main__":
    main()
