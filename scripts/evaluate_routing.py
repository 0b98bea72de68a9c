#!/usr/bin/env python3
"""Evaluate one DTS-gate checkpoint three ways, so that a mismatch between how the model trained and
how it is evaluated shows as a number:

  argmax   each token to argmax(l), weight softmax(l) (what evaluation and generation do)
  sample   the training rule of the checkpoint's phase, Gumbel noise included (hard phase: top-1
           by argmax(l + g) or as --dts-hard-routing says; soft phase: the threshold or scheduled
           selection), nothing dropped; the loss averaged over --draws noise draws
  softmax  every expert, weighted by softmax(l) (a dense mixture of the same experts)

    python scripts/evaluate_routing.py DATA-BIN --path CKPT [--split valid] [--draws 5] [--json OUT]

It prints, per routing, the task loss per target token (base 2, as fairseq logs it) and its
perplexity, and for `sample` in the hard phase the share of tokens whose sampled expert is the
evaluation's expert (moe_hard_eval_agree_pct; per MoE layer, then the mean). The loss is the
criterion's task loss (label-smoothed for translation) over the split's target tokens; the model
runs in evaluation mode (no dropout) on CPU unless --gpu. Only checkpoints whose MoE layers use
the DTS gate (--moe-gate dts, the *_evomoe* architectures) can be evaluated."""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # checkpoint_data

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="binarized data folder (fairseq-preprocess output) of the checkpoint's task")
    p.add_argument("--path", required=True, help="the checkpoint")
    p.add_argument("--split", default="valid", help="split to evaluate (default valid)")
    p.add_argument("--draws", type=int, default=5, help="noise draws averaged for the sample routing (default 5)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    p.add_argument("--max-batches", type=int, default=0, help="evaluate only the first N batches (default: all)")
    p.add_argument("--seed", type=int, default=1, help="seed of the first noise draw (draw k uses seed + k)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--gpu", action="store_true", help="evaluate on the GPU (default: CPU)")
    a = p.parse_args(argv)
    if a.draws < 1:
        p.error(f"--draws must be >= 1, got {a.draws}")
    if a.max_batches < 0 or a.max_tokens < 1:
        p.error(f"--max-batches must be >= 0 (0: all) and --max-tokens >= 1, got {a.max_batches} and {a.max_tokens}")
    if not Path(a.path).is_file():
        p.error(f"--path {a.path}: no such checkpoint")
    if not Path(a.data).is_dir():
        p.error(f"{a.data} is not a folder (it should hold the binarized data, e.g. dict.txt and valid.bin)")
    return a


def evaluate(a: argparse.Namespace) -> dict:
    import torch

    from checkpoint_data import load_checkpoint, split_batches
    from fairseq_evomoe.evomoe.dts_gate import EVAL_ROUTING, DenseToSparseGate

    model, layers, task, criterion = load_checkpoint(a.path, a.data, a.split, a.gpu)
    if not layers or not all(isinstance(m.gate, DenseToSparseGate) for m in layers):
        sys.exit(f"evaluate_routing: {a.path} has no DTS-gate MoE layers (--moe-gate dts); nothing to compare")
    if not all(m.gate_routes for m in layers):
        sys.exit(f"evaluate_routing: {a.path} was written before the spawn (--evomoe-diversify-updates): its MoE layers "
                 "run the base expert whatever the routing; nothing to compare")
    samples = split_batches(task, model, a.split, a.max_tokens, a.max_batches, a.gpu)
    result = {"checkpoint": str(Path(a.path).resolve()), "split": a.split, "draws": a.draws,
              "phase": int(layers[0].gate.phase), "temperature": layers[0].gate.tau, "routings": list(EVAL_ROUTING)}
    for routing in EVAL_ROUTING:
        for m in layers:
            m.gate.eval_routing = routing
        draws = range(a.draws) if routing == "sample" else range(1)
        loss, tokens, agree = 0.0, 0.0, {}
        for k in draws:
            torch.manual_seed(a.seed + k)
            for sample in samples:
                with torch.no_grad():
                    _, _, log = criterion(model, sample)
                loss += float(log["inner_loss"])
                tokens += float(log["ntokens"])
                for i, m in enumerate(layers):
                    stat = m.metadata.get("stat_hard_eval_agree_pct")
                    if stat is not None:
                        total, count = agree.get(i, (0.0, 0.0))
                        agree[i] = (total + float(stat[0]), count + float(stat[1]))
        entry = {"loss": loss / tokens / math.log(2)}
        entry["ppl"] = 2 ** entry["loss"]
        if agree:
            per_layer = [t / c for t, c in agree.values()]
            entry["hard_eval_agree_pct"] = sum(per_layer) / len(per_layer)
            entry["hard_eval_agree_pct_per_layer"] = per_layer
        result[routing] = entry
    for m in layers:
        m.gate.eval_routing = "argmax"
    return result


def main(argv=None) -> None:
    a = parse_args(argv)
    r = evaluate(a)
    print(f"{a.path} ({a.split}, phase {r['phase']}, temperature {r['temperature']:.3g})")
    print(f"{'routing':<8} {'loss (base 2)':>14} {'ppl':>10}  tokens whose sampled expert is argmax(l)")
    for routing in r["routings"]:
        e = r[routing]
        agree = f"{e['hard_eval_agree_pct']:.1f}%" if "hard_eval_agree_pct" in e else "-"
        print(f"{routing:<8} {e['loss']:>14.4f} {e['ppl']:>10.2f}  {agree}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
