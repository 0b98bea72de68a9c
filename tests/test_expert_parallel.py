"""Expert parallelism over torch.distributed (gloo, CPU, 2 processes; 4 for the placements of W = 4).

(a) the all_to_all MoE layer equals a single-process layer holding every expert: outputs, input
    gradients, gate gradients (summed over workers) and expert gradients (x W, see moe/parallel/exchange.py),
    including workers with 0 tokens, experts with 0 tokens, top-2 (uneven splits) and replicated
    experts (E < W); bad E/W combinations fail at build; expert checkpoint hooks gather and slice.
    The optimizer side: the gradient norm (and clipping) counts every expert once, and the
    optimizer's expert state is saved complete from rank 0 and sliced again on load.
(b) the real `fairseq-train` under torchrun with 2 workers gives the loss and gradient-norm curves of
    one process on the same global batches, with clipping; its checkpoint holds the single-process
    weights and optimizer state, reloads in one process and `fairseq-generate` translates with it;
    `--restore-file` resumes it (optimizer state included) on 1 or 2 workers exactly as the
    single-process checkpoint resumes.
"""

import copy
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

from conftest import REPO, USER_DIR, python_for_scripts, run_cli, translate_test_set

WORLD = 2

pytestmark = pytest.mark.slow  # every test spawns worker processes (torch.multiprocessing, torchrun + fairseq-train)


# ------------------------------------------------------------------------------------------
# (a) unit level: 2 spawned processes
# ------------------------------------------------------------------------------------------


def _layer_pair(gate, num_experts, world, rank, dim=8, ffn=16, diversify=False):
    """A single-process layer with all experts, and the expert-parallel copy of it for `rank` (with
    diversify, an EvoMoE layer before its spawn: every worker holds the base expert)."""
    from moe_helpers import make_layer

    from fairseq_evomoe.evomoe.expert_diversify import DiversifyingMoELayer, DiversifyPlan
    from fairseq_evomoe.evomoe.spawn import SpawnSettings
    from fairseq_evomoe.models.moe_stack import distribute_experts
    from fairseq_evomoe.moe.layer import MoELayer
    from fairseq_evomoe.moe.parallel.placement import ExpertPlacement

    # top-2 with a deterministic second expert: sampled policies draw per token, and a worker sees
    # a different slice of the batch than the single process
    extra = {"moe_second_expert_policy": "all"} if gate == "top2" else {}
    ref = make_layer(gate=gate, num_experts=num_experts, dim=dim, ffn=ffn, capacity_factor=0.0, seed=3, **extra)
    par = ExpertPlacement.from_environment(num_experts)
    assert (par.world_size, par.rank) == (world, rank)
    experts = distribute_experts(copy.deepcopy(ref.experts), par)
    options = dict(capacity_factor=0.0, padding_idx=ref.padding_idx, placement=par)
    if diversify:
        plan = DiversifyPlan(updates=10**9, spawn=SpawnSettings())
        return ref, DiversifyingMoELayer(copy.deepcopy(ref.gate), experts, plan, **options), par
    return ref, MoELayer(copy.deepcopy(ref.gate), experts, **options), par


def _tokens(sizes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in sizes], [torch.randn(n, dim, generator=g) for n in sizes]


def _check_case(rank, world, gate, num_experts, sizes, seed, all_to_expert_0=False):
    from fairseq_evomoe.moe.parallel.checkpoint import gather_experts

    ref, layer, par = _layer_pair(gate, num_experts, world, rank)
    xs, gs = _tokens(sizes, 8, seed)
    if all_to_expert_0:  # (top-1, 2 experts) each token turned to where expert 0 wins: worker 1 receives no row
        w = ref.gate.router.wg.weight.detach()
        xs = [torch.where((x @ (w[0] - w[1]) > 0)[:, None], x, -x) for x in xs]

    # reference: every worker's tokens through all experts in one layer (dropless routing is per token)
    x_all = torch.cat(xs).requires_grad_(True)
    torch.manual_seed(0)
    y_all = ref.forward_tokens(x_all, None)
    (y_all * torch.cat(gs)).sum().backward()

    # expert parallel: this worker's tokens only
    x = xs[rank].clone().requires_grad_(True)
    torch.manual_seed(0)
    y = layer.forward_tokens(x, None)
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
    gather_experts(layer)
    layer.experts.fc2_bias.data.add_(1.0)  # as fairseq's optimizers step: through .data, no version change
    if rank == 0:
        with pytest.raises(RuntimeError, match="gathered on rank 0"):
            layer.state_dict()
    full_sd = {f"experts.{k}": v for k, v in ref.experts.state_dict().items()}
    full_sd.update({f"gate.{k}": v for k, v in ref.gate.state_dict().items()})
    layer.load_state_dict(full_sd)
    torch.testing.assert_close(layer.experts.fc1_weight.detach(), ref.experts.fc1_weight.detach()[experts])


def _check_raw_exchange(rank, world):
    """all_to_all with uneven and empty splits, forward and backward (2 workers)."""
    from fairseq_evomoe.moe.parallel.collectives import all_to_all

    x = torch.arange(3.0 * (rank + 1)).reshape(-1, 1).requires_grad_(True)  # rank 0: 3 rows, rank 1: 6 rows
    in_splits = [1, 2] if rank == 0 else [6, 0]
    out_splits = [1, 6] if rank == 0 else [2, 0]
    y = all_to_all(x, out_splits, in_splits)
    (y * (rank + 1)).sum().backward()
    assert y.shape[0] == sum(out_splits)
    assert torch.equal(x.grad, torch.tensor([[1.0], [2.0], [2.0]]) if rank == 0 else torch.ones(6, 1))


def _check_bad_placement(rank, world):
    from fairseq_evomoe.moe.parallel.placement import ExpertPlacement

    with pytest.raises(ValueError, match=r"--moe-expert-count 3 .*world size of 2"):
        ExpertPlacement.from_environment(3)


def _worker(rank, world, init_file, checks):
    """One spawned worker: runs each (label, check function, *args) with (rank, world) first,
    naming the rank and the case in a failure. The process group is set up and torn down as the
    plugin does for fairseq's workers (moe/parallel/process_group.py), and its gloo threads must be
    gone before the worker exits: a thread left running can abort the finished worker at exit."""
    from fairseq_evomoe.moe.parallel.process_group import before_process_group, destroy_process_groups, gloo_threads

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    before_process_group()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for label, check, *args in checks:
            try:
                check(rank, world, *args)
            except Exception as exc:
                traceback.print_exc()
                raise AssertionError(f"rank {rank}, {label}: {exc}") from exc
        dist.barrier()
    finally:
        destroy_process_groups()
    assert not gloo_threads(), f"rank {rank}: gloo threads still running after the process group was destroyed: {gloo_threads()}"


def _spawn(world, checks):
    from forked_workers import run_workers

    with tempfile.TemporaryDirectory() as d:
        run_workers(_worker, (world, os.path.join(d, "rendezvous"), checks), world)


def _layer_cases(cases):
    return [(f"case gate={g} E={e} tokens={sizes}", _check_case, g, e, sizes, seed) for g, e, sizes, seed in cases]


def _optimizer_cases(cases):
    return [(f"E={e}, diversify={div}", _check_optimizer_side, e, div) for e, div in cases]


def test_expert_parallel_layer_matches_single_process():
    _spawn(WORLD, [("raw exchange", _check_raw_exchange)] + _layer_cases([
        ("top1", 4, [37, 21], 1),  # 2 experts per worker
        ("top2", 4, [29, 40], 2),  # top-2: uneven splits, 2 assignments per token
        ("top2", 2, [16, 24], 3),  # 1 expert per worker
        ("top1", 1, [11, 7], 4),  # replicated: both workers hold expert 0
        ("top2", 4, [5, 0], 5),  # worker 1 has no token at all; some experts get none
        ("top1", 8, [3, 2], 6),  # most experts get no token
    ]) + [("every token to worker 0's expert", _check_case, "top1", 2, [9, 7], 7, True),
          ("E=3 on 2 workers", _check_bad_placement)])


def test_expert_parallel_gradient_norm_and_optimizer_state():
    _spawn(WORLD, _optimizer_cases([(4, False), (1, False), (4, True)]))


def test_expert_parallel_on_four_workers():
    """W = 4: one and two experts per worker, and replicated experts with a block of 2 workers
    (E = 2: replica groups {0, 2} and {1, 3}), layer and optimizer side."""
    _spawn(4, _layer_cases([("top1", 4, [13, 9, 0, 11], 1), ("top2", 8, [10, 12, 7, 5], 2),
                            ("top1", 2, [9, 14, 6, 8], 3), ("top2", 2, [4, 0, 15, 6], 4)])
           + _optimizer_cases([(2, False), (8, False), (2, True)]))


def _fairseq_like_main(i, main, init_method, kwargs):
    """What fairseq's distributed_main does, in short: the group, the training, a closing barrier."""
    dist.init_process_group("gloo", init_method=init_method, rank=i, world_size=WORLD)
    main()
    dist.barrier()


def _fairseq_like_training():
    p = torch.nn.Parameter(torch.ones(3))
    torch.optim.Adam([p])  # fairseq builds its optimizer after the group exists: torch.optim imports torch._dynamo
    dist.all_reduce(p.data)


def _teardown_worker(rank, init_file, wrapped, out_dir):
    import json

    from fairseq_evomoe.moe.parallel import process_group

    assert "torch._dynamo" not in sys.modules
    if wrapped:
        process_group.ending_cleanly(_fairseq_like_main)(rank, _fairseq_like_training, f"file://{init_file}", {})
    else:
        _fairseq_like_main(rank, _fairseq_like_training, f"file://{init_file}", {})
        process_group.destroy_process_groups()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(process_group.gloo_threads()))


def test_worker_teardown_joins_gloo_threads(tmp_path):
    """The cause of a rare abort at the exit of finished workers ("terminate called without an
    active exception"): torch._dynamo, imported by the first optimizer after the process group
    exists, keeps the group alive through destroy_process_group(), so gloo's threads still run
    while the interpreter exits (with torch 2.13 both workers still had gloo threads then, when
    `_teardown_worker` ran unwrapped). The plugin's wrap of fairseq's distributed_main
    (patches.py) imports it first; then destroying the group joins the threads."""
    import json

    from forked_workers import run_workers

    run_workers(_teardown_worker, (str(tmp_path / "rendezvous"), True, str(tmp_path)), WORLD, fresh=True)
    left = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    assert left == [[], []], left


def test_plugin_wraps_fairseq_distributed_main():
    import fairseq.distributed.utils as distributed_utils

    import fairseq_evomoe  # noqa: F401  (installs the patches)

    assert getattr(distributed_utils.distributed_main, "ends_cleanly", False)


def _as_after_fairseq_all_reduce(layer, ref, world):
    """Give the expert-parallel layer the gradients fairseq's trainer holds before clipping: dense
    ones all-reduced (DDP average x W), expert ones x W; return (ep params, ref params) in order."""
    for p in layer.gate.parameters():
        dist.all_reduce(p.grad)
    for p in layer.experts.parameters():
        p.grad.mul_(world)
    return list(layer.gate.parameters()) + list(layer.experts.parameters()), \
        list(ref.gate.parameters()) + list(ref.experts.parameters())


def _check_optimizer_side(rank, world, num_experts, diversify):
    """Gradient norm and clipping count every expert once; the optimizer's expert state is saved
    complete from rank 0 and sliced again on load (moe/parallel/grad_norm.py, optimizer_state.py)."""
    from fairseq import utils

    ref, layer, par = _layer_pair("top1", num_experts, world, rank, diversify=diversify)
    xs, gs = _tokens([23, 17, 0, 12][:world], 8, 7)
    x_all = torch.cat(xs)
    if diversify:  # EvoMoE's base expert: every worker holds a copy (global expert 0)
        (ref.experts.forward_one(x_all, 0) * torch.cat(gs)).sum().backward()
        (layer.base_expert_forward(xs[rank]) * gs[rank]).sum().backward()
        for p in layer.gate.parameters():
            p.grad = torch.zeros_like(p)
        for p in ref.gate.parameters():
            p.grad = torch.zeros_like(p)
    else:
        (ref.forward_tokens(x_all, None) * torch.cat(gs)).sum().backward()
        (layer.forward_tokens(xs[rank], None) * gs[rank]).sum().backward()
    mine, full = _as_after_fairseq_all_reduce(layer, ref, world)

    want = utils.clip_grad_norm_(full, 0.0)  # one process: nothing tagged, every expert counted
    got = utils.clip_grad_norm_(mine, 0.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    max_norm = 0.5 * float(want)  # clips
    utils.clip_grad_norm_(full, max_norm)
    utils.clip_grad_norm_(mine, max_norm)
    local = list(par.local_experts)
    if diversify:  # every worker's slot 0 is the base expert; the other slots get no gradient
        torch.testing.assert_close(layer.experts.fc2_weight.grad[0], ref.experts.fc2_weight.grad[0], atol=1e-6, rtol=1e-5)
        return
    torch.testing.assert_close(layer.experts.fc2_weight.grad, ref.experts.fc2_weight.grad[local], atol=1e-6, rtol=1e-5)

    opt_full = torch.optim.Adam(full, lr=0.01)
    opt_mine = torch.optim.Adam(mine, lr=0.01)
    opt_full.step()
    opt_mine.step()
    opt_mine.consolidate_state_dict()  # attached at the first step; fairseq calls it before saving
    if rank == 0:
        saved, expected = opt_mine.state_dict(), opt_full.state_dict()
        for i in expected["state"]:
            for k, v in expected["state"][i].items():
                torch.testing.assert_close(saved["state"][i][k], v, atol=1e-6, rtol=1e-4, msg=f"param {i} {k}")
        assert opt_mine.state[layer.experts.fc1_weight]["exp_avg"].shape[0] == par.num_local_experts
        with torch.no_grad():
            layer.experts.fc1_weight.grad.mul_(2)
        opt_mine.step()  # the gathered state is now stale
        with pytest.raises(RuntimeError, match="consolidate_state_dict"):
            opt_mine.state_dict()
    # resume on W workers from a single-process checkpoint: every worker keeps its slice
    resumed = torch.optim.Adam(mine, lr=0.01)
    resumed.load_state_dict(copy.deepcopy(opt_full.state_dict()))
    for p, q in zip(mine, full):
        p.grad = q.grad[local].clone() if getattr(p, "expert", False) else q.grad.clone()
        with torch.no_grad():
            p.copy_(q[local] if getattr(p, "expert", False) else q)
    resumed.step()
    opt_full.step()
    torch.testing.assert_close(layer.experts.fc1_weight.detach(), ref.experts.fc1_weight.detach()[local], atol=1e-6, rtol=1e-5)
    assert resumed.state[layer.experts.fc1_weight]["exp_avg_sq"].shape[0] == par.num_local_experts


# ------------------------------------------------------------------------------------------
# (b) the real fairseq-train CLI: 2 workers (torchrun, gloo) vs 1 process on the same batches
# ------------------------------------------------------------------------------------------

# dropout 0, dropless routing and a deterministic top-2 make the computation independent of how
# the batch is split between workers. W=2 takes batches (2i, 2i+1) as the two workers' halves of
# update i; W=1 with --update-freq 2 takes the same two batches in one update: same global batch.
CLIP_NORM = 1.0  # clips some of the updates (the test checks that it does)
TRAIN_ARGS = [
    "--user-dir", USER_DIR, "--task", "translation", "--arch", "transformer_moe_tiny",
    "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--cpu", "--optimizer", "adam", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
    "--max-tokens", "800", "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
    "--moe-expert-count", "4", "--moe-gate", "top2", "--moe-second-expert-policy", "all",
    "--moe-capacity-factor", "0", "--clip-norm", str(CLIP_NORM), "--max-update", "6", "--seed", "1",
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
    cmd = [python_for_scripts(), "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--no-python", python_for_scripts(), "-m", "fairseq_evomoe.distributed.train", *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _load(path):
    import fairseq_evomoe  # noqa: F401  (allowlists fairseq's checkpoint types)

    return torch.load(path, map_location="cpu", weights_only=False)


def _optimizer_state(ckpt):
    state = _load(ckpt)
    return state["last_optimizer_state"]["state"], state["optimizer_history"][-1]["num_updates"]


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
    # the gradient norm counts every expert once, on 2 workers as in one process; --clip-norm clips
    assert gnorm2[: len(gnorm1)] == pytest.approx(gnorm1, rel=1e-3), (gnorm2, gnorm1)
    assert max(gnorm1) > CLIP_NORM
    assert valid2[0] == pytest.approx(valid1[0], abs=2e-3)

    # the W=2 checkpoint holds every expert once, in the single-process format, with the same weights
    m2, m1 = _load(two / "checkpoint_last.pt")["model"], _load(one / "checkpoint_last.pt")["model"]
    assert m2.keys() == m1.keys()
    for k in m1:
        assert m2[k].shape == m1[k].shape, k
        if m1[k].is_floating_point():
            torch.testing.assert_close(m2[k], m1[k], atol=1e-4, rtol=1e-3, msg=k)
    assert m2["encoder.layers.1.moe.experts.fc1_weight"].shape[0] == 4
    # ... and the Adam moments of every parameter, the experts' gathered from both workers, as one
    # process has them (same parameter order, same shapes: [E, ...] for the experts)
    (o2, n2), (o1, n1) = _optimizer_state(two / "checkpoint_last.pt"), _optimizer_state(one / "checkpoint_last.pt")
    assert n2 == n1 == 6 and o2.keys() == o1.keys()
    assert any(s["exp_avg"].shape[:1] == (4,) and s["exp_avg"].dim() == 3 for s in o1.values())
    for i in o1:
        for k in ("exp_avg", "exp_avg_sq"):
            assert o2[i][k].shape == o1[i][k].shape, (i, k)
            torch.testing.assert_close(o2[i][k], o1[i][k], atol=1e-6, rtol=2e-2, msg=f"parameter {i} {k}")

    # ... loads in one process and generates
    translate_test_set(mt_data, two / "checkpoint_last.pt")

    # ... and resumes, optimizer state and learning-rate schedule included (no --reset-optimizer), in
    # one process or on 2 workers, exactly as the single-process checkpoint does (--reset-dataloader
    # makes all three continue on the same batches)
    more = ["--max-update", "8", "--reset-dataloader"]
    r1 = run_cli("fairseq-train", mt_data, *TRAIN_ARGS, "--update-freq", "2", "--save-dir", tmp_path / "r1",
                 "--restore-file", one / "checkpoint_last.pt", *more)
    r21 = run_cli("fairseq-train", mt_data, *TRAIN_ARGS, "--update-freq", "2", "--save-dir", tmp_path / "r21",
                  "--restore-file", two / "checkpoint_last.pt", *more)
    r22 = _torchrun(mt_data, *TRAIN_ARGS, "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
                    "--save-dir", tmp_path / "r22", "--restore-file", two / "checkpoint_last.pt", *more)
    want = _curve(r1.stdout + r1.stderr)[0]
    assert len(want) == 2  # updates 7 and 8
    for name, run in (("2 workers -> 1 process", r21), ("2 workers -> 2 workers", r22)):
        got = _curve(run.stdout + run.stderr)[0]
        assert got == pytest.approx(want, abs=2e-3), (name, got, want)
