"""Expert parallelism over torch.distributed (gloo, CPU, 2 processes).

(a) the all_to_all MoE layer equals a single-process layer holding every expert: outputs, input
    gradients, gate gradients (summed over workers) and expert gradients (x W, see moe/parallel.py),
    including workers with 0 tokens, experts with 0 tokens, top-2 (uneven splits) and replicated
    experts (E < W); bad E/W combinations fail at build; expert checkpoint hooks gather and slice.
(b) the real `fairseq-train` under torchrun with 2 workers gives the loss curve of one process on the
    same global batches; its checkpoint reloads in one process and `fairseq-generate` translates
    with it; `--restore-file` continues training from it in one process.
"""

import copy
import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, USER_DIR, run_cli

WORLD = 2


# ------------------------------------------------------------------------------------------
# (a) unit level: 2 spawned processes
# ------------------------------------------------------------------------------------------


def _layer_pair(gate, num_experts, world, rank, dim=8, ffn=16):
    """A single-process layer with all experts, and the expert-parallel copy of it for `rank`."""
    from moe_helpers import make_layer

    from fairseq_evomoe.moe.layer import MoELayer
    from fairseq_evomoe.moe.parallel import ExpertParallel

    # top-2 with a deterministic second expert: sampled policies draw per token, and a worker sees
    # a different slice of the batch than the single process
    extra = {"moe_second_expert_policy": "all"} if gate == "top2" else {}
    ref = make_layer(gate=gate, num_experts=num_experts, dim=dim, ffn=ffn, capacity_factor=0.0, seed=3, **extra)
    par = ExpertParallel.from_environment(num_experts)
    assert (par.world_size, par.rank) == (world, rank)
    experts = par.localize(copy.deepcopy(ref.experts))
    layer = MoELayer(copy.deepcopy(ref.gate), experts, capacity_factor=0.0, padding_idx=ref.padding_idx, parallel=par)
    return ref, layer, par


def _tokens(sizes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in sizes], [torch.randn(n, dim, generator=g) for n in sizes]


def _check_case(rank, world, gate, num_experts, sizes, seed):
    from fairseq_evomoe.moe.expert_checkpoint import gather_experts

    ref, layer, par = _layer_pair(gate, num_experts, world, rank)
    xs, gs = _tokens(sizes, 8, seed)

    # reference: every worker's tokens through all experts in one layer (dropless routing is per token)
    x_all = torch.cat(xs).requires_grad_(True)
    torch.manual_seed(0)
    y_all = ref.sparse_forward(x_all, None)
    (y_all * torch.cat(gs)).sum().backward()

    # expert parallel: this worker's tokens only
    x = xs[rank].clone().requires_grad_(True)
    torch.manual_seed(0)
    y = layer.sparse_forward(x, None)
    (y * gs[rank]).sum().backward()

    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y, y_all[rows].detach(), **tol)
    torch.testing.assert_close(x.grad, x_all.grad[rows], **tol)
    for (n, p), (_, q) in zip(layer.gate.named_parameters(), ref.gate.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)  # what DDP does (x 1/W, undone by fairseq's x W / sample_size)
        torch.testing.assert_close(g, q.grad, **tol, msg=f"gate {n}")
    experts = list(par.local_experts)
    for n in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        mine = getattr(layer.experts, n)
        full = getattr(ref.experts, n)
        torch.testing.assert_close(mine.detach(), full.detach()[experts])
        # expert grads are already summed over every worker's tokens and scaled by 1/W
        torch.testing.assert_close(mine.grad * world, full.grad[experts], **tol, msg=f"expert {n}")

    # checkpoint hooks: rank 0 saves all experts after a gather; every rank loads its slice
    layer.eval()
    gather_experts(layer)
    if rank == 0:
        sd = layer.state_dict()
        for n in ("fc1_weight", "fc2_bias"):
            torch.testing.assert_close(sd[f"experts.{n}"], getattr(ref.experts, n).detach())
    with torch.no_grad():
        layer.experts.fc1_weight.add_(1.0)  # changes the local weights: the gathered copy is stale
    if rank == 0:
        with pytest.raises(RuntimeError, match="gathered on rank 0"):
            layer.state_dict()
    full_sd = {f"experts.{k}": v for k, v in ref.experts.state_dict().items()}
    full_sd.update({f"gate.{k}": v for k, v in ref.gate.state_dict().items()})
    full_sd["spawned"] = ref.spawned
    layer.load_state_dict(full_sd)
    torch.testing.assert_close(layer.experts.fc1_weight.detach(), ref.experts.fc1_weight.detach()[experts])


def _worker(rank, world, init_file):
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from fairseq_evomoe.moe.parallel import ExpertParallel, all_to_all

        # raw exchange with uneven and empty splits, forward and backward
        x = torch.arange(3.0 * (rank + 1)).reshape(-1, 1).requires_grad_(True)  # rank 0: 3 rows, rank 1: 6 rows
        in_splits = [1, 2] if rank == 0 else [6, 0]
        out_splits = [1, 6] if rank == 0 else [2, 0]
        y = all_to_all(x, out_splits, in_splits)
        (y * (rank + 1)).sum().backward()
        assert y.shape[0] == sum(out_splits)
        assert torch.equal(x.grad, torch.tensor([[1.0], [2.0], [2.0]]) if rank == 0 else torch.ones(6, 1))

        cases = [
            ("top1", 4, [37, 21], 1),  # 2 experts per worker
            ("top2", 4, [29, 40], 2),  # top-2: uneven splits, 2 assignments per token
            ("top2", 2, [16, 24], 3),  # 1 expert per worker
            ("top1", 1, [11, 7], 4),  # replicated: both workers hold expert 0
            ("top2", 4, [5, 0], 5),  # worker 1 has no token at all; some experts get none
            ("top1", 8, [3, 2], 6),  # most experts get no token
        ]
        for gate, e, sizes, seed in cases:
            try:
                _check_case(rank, world, gate, e, sizes, seed)
            except Exception as exc:  # name the case and the rank in the failure
                traceback.print_exc()
                raise AssertionError(f"rank {rank}, case gate={gate} E={e} tokens={sizes}: {exc}") from exc

        with pytest.raises(ValueError, match=r"--moe-expert-count 3 .*world size of 2"):
            ExpertParallel.from_environment(3)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_layer_matches_single_process():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(WORLD, os.path.join(d, "rendezvous")), nprocs=WORLD, join=True)


# ------------------------------------------------------------------------------------------
# (b) the real fairseq-train CLI: 2 workers (torchrun, gloo) vs 1 process on the same batches
# ------------------------------------------------------------------------------------------

# dropout 0, dropless routing and a deterministic top-2 make the computation independent of how
# the batch is split between workers. W=2 takes batches (2i, 2i+1) as the two workers' halves of
# update i; W=1 with --update-freq 2 takes the same two batches in one update: same global batch.
TRAIN_ARGS = [
    "--user-dir", USER_DIR, "--task", "translation", "--arch", "transformer_moe_tiny",
    "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--cpu", "--optimizer", "adam", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
    "--max-tokens", "800", "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
    "--moe-expert-count", "4", "--moe-gate", "top2", "--moe-second-expert-policy", "all",
    "--moe-capacity-factor", "0", "--clip-norm", "0", "--max-update", "6", "--seed", "1",
    "--log-format", "json", "--log-interval", "1", "--no-epoch-checkpoints", "--num-workers", "0",
]


def _curve(log: str):
    # the log line prefix differs between `fairseq-train` and the `-m` entry point; the json does not
    rows = [line for line in log.splitlines() if "train_inner" in line and '"loss"' in line]
    loss = [float(re.search(r'"loss": "([0-9.]+)"', r).group(1)) for r in rows]
    gnorm = [float(re.search(r'"gnorm": "([0-9.]+)"', r).group(1)) for r in rows]
    valid = [float(v) for v in re.findall(r'"valid_loss": "([0-9.]+)"', log)]
    return loss, gnorm, valid


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "fairseq_evomoe.distributed.train", *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _load(path):
    import fairseq_evomoe  # noqa: F401  (allowlists fairseq's checkpoint types)

    return torch.load(path, map_location="cpu", weights_only=False)


def test_cli_two_workers_match_one_process_and_checkpoint_loads_anywhere(mt_data, tmp_path):
    two, one = tmp_path / "w2", tmp_path / "w1"
    p2 = _torchrun(mt_data, *TRAIN_ARGS, "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
                   "--save-dir", two)
    log2 = p2.stdout + p2.stderr
    assert "distributed init (rank 1)" in log2, "torchrun did not start 2 fairseq workers"
    p1 = run_cli("fairseq-train", mt_data, *TRAIN_ARGS, "--update-freq", "2", "--save-dir", one)
    loss2, gnorm2, valid2 = _curve(log2)
    loss1, gnorm1, valid1 = _curve(p1.stdout + p1.stderr)
    assert len(loss1) == 6 and loss2[: len(loss1)] == pytest.approx(loss1, abs=2e-3), (loss2, loss1)
    # no clipping here: one process counts the experts in the gradient norm, expert parallelism
    # leaves them out (fairseq 0.12's clip_grad_norm_ skips `p.expert`; docs/distributed.md)
    assert all(g2 <= g1 + 2e-3 for g2, g1 in zip(gnorm2, gnorm1)), (gnorm2, gnorm1)
    assert valid2[0] == pytest.approx(valid1[0], abs=2e-3)

    # the W=2 checkpoint holds every expert once, in the single-process format, with the same weights
    m2, m1 = _load(two / "checkpoint_last.pt")["model"], _load(one / "checkpoint_last.pt")["model"]
    assert m2.keys() == m1.keys()
    for k in m1:
        assert m2[k].shape == m1[k].shape, k
        if m1[k].is_floating_point():
            torch.testing.assert_close(m2[k], m1[k], atol=1e-4, rtol=1e-3, msg=k)
    assert m2["encoder.layers.1.moe.experts.fc1_weight"].shape[0] == 4

    # ... loads in one process: generation and continued training
    gen = run_cli("fairseq-generate", mt_data, "--user-dir", USER_DIR, "--path", two / "checkpoint_last.pt",
                  "--cpu", "--gen-subset", "test", "--max-tokens", "2000", "--beam", "2", "--max-len-b", "20")
    hyps = [line for line in gen.stdout.splitlines() if line.startswith("H-")]
    srcs = [line for line in gen.stdout.splitlines() if line.startswith("S-")]
    assert len(hyps) == len(srcs) > 50, gen.stdout[-2000:]
    # expert Adam moments are rank 0's only (docs/distributed.md): resume with --reset-optimizer
    run_cli("fairseq-train", mt_data, *TRAIN_ARGS, "--update-freq", "2", "--save-dir", tmp_path / "resumed",
            "--restore-file", two / "checkpoint_last.pt", "--reset-optimizer", "--max-update", "2")
