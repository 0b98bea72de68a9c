#!/usr/bin/env python
"""Benchmark: what each EvoMoE phase costs, measured in one run.

One MoE layer (model dim 512, FFN 2048, E experts, 4096 tokens, fwd+bwd) through the phases:
  dense FFN (reference) | expert-diversify (base expert as a dense FFN) |
  DTS soft routing as tau anneals (experts per token E -> ~1) | DTS hard top-1 | Switch top-1.
The DTS gate dispatches only the selected (token, expert) pairs, so its step time should follow the
mean number of experts per token; the script fits time = a + b * experts_per_token and prints it.
Measured results: docs/benchmarks.md.

    python benchmarks/bench_dts.py                 # CPU (default)
    python benchmarks/bench_dts.py --device cuda --dtype bfloat16
"""

import argparse
import statistics
import time
from argparse import Namespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_evomoe.moe.experts import ExpertFFNs
from fairseq_evomoe.evomoe.dts_gate import DenseToSparseGate
from fairseq_evomoe.evomoe.expert_diversify import DiversifyingMoELayer, DiversifyPlan
from fairseq_evomoe.evomoe.spawn import SpawnSettings
from fairseq_evomoe.moe.gates.top_k import Top1Gate
from fairseq_evomoe.moe.layer import MoELayer



def experts_per_token(layer, x) -> float:
    """The layer's experts per token on x, from one more forward that collects statistics (the timed
    steps collect none, as between fairseq's log lines), with the timed steps' noise seed."""
    layer.collect_stats = True
    torch.manual_seed(1)
    with torch.no_grad():
        layer(x)
    layer.collect_stats = False
    return layer.metadata["experts_per_token"].item()

def ms(secs: float) -> str:
    """Milliseconds, with decimals where a GPU step is a few ms."""
    return f"{1000 * secs:.0f}" if secs >= 0.1 else f"{1000 * secs:.2f}"


def dts_args(anneal, tau_min):
    return Namespace(moe_router_jitter=0.0, dts_threshold=1e-3, dts_combine_weights="softmax", dts_renormalize=False,
                     dts_max_experts=0, dts_tau_max=2.0, dts_tau_min=tau_min, dts_tau_schedule="exponential",
                     dts_anneal_updates=anneal, dts_hard_update=anneal + 1, evomoe_diversify_updates=0, max_update=0)


def step_time(module, x, grad, reps, sync):
    times = []
    for _ in range(reps + 1):
        for p in module.parameters():
            p.grad = None
        sync()
        t0 = time.perf_counter()
        module(x).backward(grad)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    E, S = args.experts, args.tokens
    torch.manual_seed(0)
    x = torch.randn(S, args.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    anneal, tau_min = 100, 0.02
    experts = ExpertFFNs(E, args.dim, args.ffn, F.relu)
    plan = DiversifyPlan(updates=1, spawn=SpawnSettings())
    dts = DiversifyingMoELayer(DenseToSparseGate(args.dim, E, dts_args(anneal, tau_min)), experts, plan, capacity_factor=1.0)
    top1 = MoELayer(Top1Gate(args.dim, E, Namespace(moe_router_jitter=0.0)), ExpertFFNs(E, args.dim, args.ffn, F.relu),
                    capacity_factor=1.0)
    dense = nn.Sequential(nn.Linear(args.dim, args.ffn), nn.ReLU(), nn.Linear(args.ffn, args.dim))
    for m in (dts, top1, dense):
        m.to(device=device, dtype=dtype).train()

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"EvoMoE phases: one MoE layer fwd+bwd, E={E}, {S} tokens, dim {args.dim}, FFN {args.ffn}, {args.dtype}, {where}")
    rows = [("dense FFN", "", 1.0, step_time(dense, x, grad, args.reps, sync))]
    dts.spawned.fill_(False)
    rows.append(("expert-diversify (base expert)", "", 1.0, step_time(dts, x, grad, args.reps, sync)))
    dts.spawned.fill_(True)
    fit = []
    for t in (0, 30, 55, 75, 90, 100):
        dts.gate.set_num_updates(t)
        torch.manual_seed(1)
        secs = step_time(dts, x, grad, args.reps, sync)
        ept = experts_per_token(dts, x)
        fit.append((ept, secs))
        rows.append(("DTS soft" if t <= anneal else "DTS hard", f"{dts.gate.tau:.3f}", ept, secs))
    dts.gate.set_num_updates(anneal + 1)
    secs = step_time(dts, x, grad, args.reps, sync)
    fit.append((1.0, secs))
    rows.append(("DTS hard (top-1)", f"{dts.gate.tau:.3f}", experts_per_token(dts, x), secs))
    top1_secs = step_time(top1, x, grad, args.reps, sync)
    rows.append(("Switch top-1", "", experts_per_token(top1, x), top1_secs))

    print("| phase | tau | experts/token | ms / step | / top-1 | / dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tau, ept, secs in rows:
        print(f"| {name} | {tau} | {ept:.2f} | {ms(secs)} | {secs / top1_secs:.2f}x | {secs / rows[0][3]:.2f}x |")
    xs, ys = [a for a, _ in fit], [b for _, b in fit]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((u - mx) * (v - my) for u, v in fit) / max(sum((u - mx) ** 2 for u in xs), 1e-12)
    a = my - b * mx
    ss = sum((v - (a + b * u)) ** 2 for u, v in fit)
    st = sum((v - my) ** 2 for v in ys) or 1e-12
    print(f"\nfit over the DTS rows: ms/step = {ms(a)} + {ms(b)} x experts_per_token (R^2 = {1 - ss / st:.3f}); "
          f"a step at {E} experts/token costs {(a + b * E) / (a + b):.1f}x a step at 1")


if __name__ == "__main__":
    main()
