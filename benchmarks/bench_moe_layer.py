#!/usr/bin/env python
"""Benchmark: MoE layer throughput against a dense FFN of equal active FLOPs, and against a
one-hot einsum dispatch (GShard/fairseq style, written here only as the comparison).

Everything is measured in this one run, interleaved (dense, index MoE, einsum MoE, repeat), and
reported as ratios. Forward + backward, fp32 on CPU (fp32 or --dtype on GPU). `--compare experts_alone`
also times the same expert FFNs on equal groups with no routing: the ceiling for per-expert matmuls
at that size (opt-in, as every extra model changes the allocation pattern the others see).

    python benchmarks/bench_moe_layer.py                      # the CPU sweep (docs/benchmarks.md has measured tables)
    python benchmarks/bench_moe_layer.py --quick              # a smaller sweep
    python benchmarks/bench_moe_layer.py --device cuda --dtype bfloat16

Memory: on CUDA the peak allocated memory of one fwd+bwd; on CPU the activations kept for the
backward (bytes of the tensors autograd saves), which is what grows with the dispatch method.

Page faults per step (median, minor faults): on CPU, a layer whose large temporaries get fresh
pages from the OS every step (glibc serves allocations of 32 MB and more with mmap until the heap
has grown) runs much slower than when they are recycled, and which happens depends on what ran
before in the process. By default (`--malloc recycle`, glibc only) the script therefore has glibc
serve every allocation from its heap and keep freed memory (mallopt M_MMAP_MAX = 0,
M_TRIM_THRESHOLD = 2 GiB), so that after the warm-up no model pays page faults and the ratios
compare computation alone; `--malloc default` keeps glibc's own policy, as a training run has it.
Compare ratios only between rows where both counts are about 0.
"""

import argparse
import ctypes
import ctypes.util
import math
import os
import statistics
import time

try:
    import resource  # Unix: page-fault counts
except ImportError:
    resource = None

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_evomoe.moe.experts import ExpertFFNs
from fairseq_evomoe.moe.gates.base import LinearRouter
from fairseq_evomoe.moe.layer import MoELayer
from fairseq_evomoe.moe.gates.top_k import Top1Gate
from argparse import Namespace


class DenseFFN(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class EinsumMoE(nn.Module):
    """Top-1 MoE with one-hot dispatch/combine tensors of shape [S, E, C] (the comparison only)."""

    def __init__(self, dim, ffn, experts, capacity_factor):
        super().__init__()
        self.router = LinearRouter(dim, experts)
        self.w1 = nn.Parameter(torch.randn(experts, dim, ffn) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(experts, 1, ffn))
        self.w2 = nn.Parameter(torch.randn(experts, ffn, dim) / math.sqrt(ffn))
        self.b2 = nn.Parameter(torch.zeros(experts, 1, dim))
        self.E, self.cf = experts, capacity_factor

    def forward(self, x):
        S = x.shape[0]
        C = max(1, math.ceil(self.cf * S / self.E))
        probs = self.router(x).softmax(-1)
        gate, expert = probs.max(-1)
        mask = F.one_hot(expert, self.E).to(x.dtype)  # [S, E]
        pos = (torch.cumsum(mask, 0) - 1) * mask  # position of each token in its expert's buffer
        keep = (pos < C).to(x.dtype) * mask
        dispatch = keep.unsqueeze(-1) * F.one_hot(pos.long().clamp(max=C - 1), C).to(x.dtype)  # [S, E, C]
        combine = dispatch * gate.to(x.dtype)[:, None, None]
        xe = torch.einsum("sec,sm->ecm", dispatch, x)
        h = torch.baddbmm(self.b2, F.relu(torch.baddbmm(self.b1, xe, self.w1)), self.w2)
        return torch.einsum("sec,ecm->sm", combine, h)


class ExpertsAlone(nn.Module):
    """The index MoE's expert FFNs on equal groups of tokens / E rows, with no router, dispatch or
    combine (--compare experts_alone): the speed any layer built on per-expert matmuls can reach at
    this size. The gap from dense to here is the matmuls' shape (tokens / E rows per
    call instead of all tokens); from here to the index MoE it is routing, dispatch and combine."""

    def __init__(self, dim, ffn, experts):
        super().__init__()
        self.experts = ExpertFFNs(experts, dim, ffn, F.relu)

    def forward(self, x):
        E = self.experts.num_experts
        counts = [x.shape[0] // E + (e < x.shape[0] % E) for e in range(E)]
        return self.experts(x, counts)


class GroupedMmExperts(ExpertFFNs):
    """The experts through torch's grouped_mm on every device (--compare grouped_mm)."""

    def forward(self, x, counts, params=None, max_rows=None):
        return self.grouped_forward(x, counts, params)


class BatchedExperts(ExpertFFNs):
    """The experts as one batched matmul per projection over [E, capacity] slots on every device
    (--compare batched): the path where grouped_mm is not preferred off the CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_shapes, self.static_path = True, "batched"


class FreshGradExperts(ExpertFFNs):
    """The CPU experts with new weight-gradient memory every backward (--compare fresh_grads)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_storage = None


# alternative expert implementations the index MoE can be timed with, against the default
VARIANTS = {"batched": BatchedExperts, "grouped_mm": GroupedMmExperts, "fresh_grads": FreshGradExperts}
COMPARISONS = sorted(VARIANTS) + ["experts_alone"]


def compared_model(name, dim, ffn, experts, capacity_factor):
    if name == "experts_alone":
        return ExpertsAlone(dim, ffn, experts)
    return index_moe(dim, ffn, experts, capacity_factor, VARIANTS[name])


def compared_cell(name, tps) -> str:
    if name == "experts_alone":
        return f" experts alone / dense {tps[name] / tps['dense']:.2f}x |"
    return f" index / {name} index {tps['index'] / tps[name]:.2f}x |"


def index_moe(dim, ffn, experts, capacity_factor, experts_cls=ExpertFFNs):
    args = Namespace(moe_router_jitter=0.0)
    gate = Top1Gate(dim, experts, args)
    return MoELayer(gate, experts_cls(experts, dim, ffn, F.relu), capacity_factor=capacity_factor)


def saved_bytes(module, x):
    """Bytes of the activations autograd keeps for the backward: each storage once, parameters
    (which exist anyway) and the input excluded."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y.float().sum().backward()
    return sum(seen.values())


def peak_cuda_bytes(module, x):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x).float().sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not count them)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def recycle_heap_memory() -> bool:
    """glibc: serve every allocation from the heap (no mmap) and never give freed memory back, so
    that repeated steps reuse the same pages instead of faulting in fresh ones. False (nothing
    changed) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def step_time(module, x, grad):
    """(seconds, minor page faults) of one forward + backward."""
    for p in module.parameters():
        p.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
    faults = minor_page_faults()
    t0 = time.perf_counter()
    y = module(x)
    y.backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, minor_page_faults() - faults


def bench(E, S, args, device, dtype):
    torch.manual_seed(0)
    dim, ffn = args.dim, args.ffn
    x = torch.randn(S, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(S, dim, device=device, dtype=dtype)
    models = {
        "dense": DenseFFN(dim, ffn),
        "index": index_moe(dim, ffn, E, args.capacity_factor),
        "einsum": EinsumMoE(dim, ffn, E, args.capacity_factor),
    }
    for name in args.compare:
        models[name] = compared_model(name, dim, ffn, E, args.capacity_factor)
    for m in models.values():
        m.to(device=device, dtype=dtype).train()
    times = {k: [] for k in models}
    faults = {k: [] for k in models}
    for _ in range(args.warmup):
        for k, m in models.items():
            step_time(m, x, grad)
    for _ in range(args.reps):
        for k, m in models.items():  # interleaved, so drift in machine load hits all three alike
            seconds, pages = step_time(m, x, grad)
            times[k].append(seconds)
            faults[k].append(pages)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_faults = {k: statistics.median(v) for k, v in faults.items()}
    measure = peak_cuda_bytes if device.type == "cuda" else saved_bytes
    mem = {k: measure(m, x) / 2**20 for k, m in models.items()}
    index = models["index"]  # its statistics from one more forward (the timed steps collect none, as between log lines)
    index.collect_stats = True
    with torch.no_grad():
        index(x)
    index.collect_stats = False
    dropped = index.metadata["dropped_frac"].item()
    return med, mem, dropped, med_faults


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--capacity-factor", type=float, default=1.0,
                   help="capacity factor of both MoE layers (0 = dropless for the index layer)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="E in {4, 64}, 4096 tokens, 3 reps")
    p.add_argument("--malloc", default="recycle", choices=["recycle", "default"],
                   help="CPU memory: recycle = glibc keeps every freed allocation for reuse, so no model pays page faults "
                   "after the warm-up (the fair comparison of computation); default = glibc's own policy (default: recycle)")
    p.add_argument("--compare", nargs="+", default=[], choices=COMPARISONS,
                   help="also time the index MoE with other expert implementations and print the default's speed "
                   "relative to each: batched = one batched matmul over [E, capacity] slots; grouped_mm = torch's grouped matmul (the CPU default is the per-group path of "
                   "moe/experts.py); fresh_grads = new weight-gradient memory every step (the default reuses it); "
                   "experts_alone = the expert FFNs on equal groups with no routing, printed as a ratio to dense")
    args = p.parse_args()
    if args.quick:
        args.experts, args.tokens, args.reps = [4, 64], [4096], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cpu":
        recycled = args.malloc == "recycle" and recycle_heap_memory()
        where += ", heap memory recycled (no page faults after warm-up)" if recycled else ", glibc's default memory policy"
    print(f"MoE layer fwd+bwd, model dim {args.dim}, FFN {args.ffn}, top-1, capacity factor {args.capacity_factor}, "
          f"{args.dtype}, {where}; median of {args.reps} interleaved reps; "
          f"load average before the run {os.getloadavg()[0]:.2f} (other jobs on the machine lower the ratios)")
    mem_name = "peak MiB" if device.type == "cuda" else "saved-for-backward MiB"
    print(f"| E | tokens | tokens/expert | dense tok/s | index MoE tok/s | index / dense "
          f"| page faults per step dense / index | einsum tok/s | index / einsum | dropped "
          f"| {mem_name} dense / index / einsum |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for E in args.experts:
        for S in args.tokens:
            med, mem, dropped, faults = bench(E, S, args, device, dtype)
            tps = {k: S / v for k, v in med.items()}
            print(f"| {E} | {S} | {S // E} | {tps['dense']:,.0f} | {tps['index']:,.0f} | {tps['index'] / tps['dense']:.2f}x "
                  f"| {faults['dense']:,.0f} / {faults['index']:,.0f} | {tps['einsum']:,.0f} | {tps['index'] / tps['einsum']:.1f}x | {100 * dropped:.1f}% "
                  f"| {mem['dense']:.0f} / {mem['index']:.0f} / {mem['einsum']:.0f} |"
                  + "".join(compared_cell(name, tps) for name in args.compare),
                  flush=True)


if __name__ == "__main__":
    main()
