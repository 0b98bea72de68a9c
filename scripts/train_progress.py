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


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--total", type=int, required=True, help="--max-update of the run")
    a = p.parse_args()
    bar = tqdm(total=a.total, desc="training", unit="upd", file=sys.stderr, dynamic_ncols=True)
    done = 0
    tail = []
    for line in sys.stdin:
        tail = (tail + [line])[-30:]
        i = line.find("{")
        rec = None
        if i >= 0:
            try:
                rec = json.loads(line[i:])
            except ValueError:
                rec = None
        if isinstance(rec, dict) and "num_updates" in rec and "loss" in rec:
            n = int(float(rec["num_updates"]))
            bar.update(max(0, n - done))
            done = max(done, n)
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
            ), file=sys.stderr)
        elif "EvoMoE phase" in line or "EvoMoE:" in line or "Traceback" in line or "Error" in line or "done training" in line:
            bar.write("  " + line.rstrip().split(" | ")[-1], file=sys.stderr)
    bar.close()
    if done < a.total:
        sys.stderr.write("training stopped at update %d of %d; last output:\n%s" % (done, a.total, "".join(tail)))


if __name__ == "__main__":
    main()
