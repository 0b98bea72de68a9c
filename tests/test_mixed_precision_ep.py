"""Mixed precision under expert parallelism (gloo, CPU, 2 workers): through the real fairseq-train for
--fp16 --fp16-no-flatten-grads and --memory-efficient-fp16 (with fairseq's gradient-norm consistency
check switched on), and at the optimizer level where fairseq does not run the mode on CPU:

- --bf16 and --fp16 --fp16-no-flatten-grads: the fp32 master copies count every expert once in the
  gradient norm (equal on every worker to one process's), the masters' optimizer state is saved
  complete, and with fairseq's FP16Optimizer an overflow in one worker's expert is an overflow on
  every worker (all skip and halve the loss scale); a finite step keeps the dense weights identical;
- --amp: an overflow in one worker's expert makes every worker skip the step and back off its loss
  scale alike; a finite step keeps the dense weights identical;
- the modes that cannot be made right (flat --fp16, FSDP) are refused before training, naming the flag."""

import argparse
import math

import pytest
import torch
import torch.distributed as dist

from test_expert_parallel import _as_after_fairseq_all_reduce, _layer_pair, _spawn, _tokens

pytestmark = pytest.mark.slow  # spawns worker processes


def _grads(rank, world):
    ref, layer, par = _layer_pair("top1", 4, world, rank)
    xs, gs = _tokens([23, 17], 8, 7)
    (ref.forward_tokens(torch.cat(xs), None) * torch.cat(gs)).sum().backward()
    (layer.forward_tokens(xs[rank], None) * gs[rank]).sum().backward()
    mine, full = _as_after_fairseq_all_reduce(layer, ref, world)
    return layer, par, mine, full


def _check_fp16_masters(rank, world):
    from fairseq import utils
    from fairseq.optim.fp16_optimizer import FP16Optimizer

    from fairseq_evomoe import patches

    patches.install_for_expert_parallelism()
    layer, par, mine, full = _grads(rank, world)
    want = utils.clip_grad_norm_(full, 0.0)  # one process, every expert counted
    with pytest.raises(ValueError, match="needs --fp16-no-flatten-grads"):  # fairseq's flat copy (hydra's path)
        FP16Optimizer.build_fp32_params(None, mine, flatten=True)
    # fairseq builds the optimizer, masters included, before the first forward: the parameters carry
    # no copy count yet (each forward sets it, parallel/exchange.py), and the masters must follow it
    copies = {id(p): p.__dict__.pop("expert_grad_copies") for p in mine if "expert_grad_copies" in p.__dict__}
    assert copies
    masters = FP16Optimizer.build_fp32_params(None, mine, flatten=False)
    for p in mine:
        if id(p) in copies:
            p.expert_grad_copies = copies[id(p)]  # what the forward sets
    for p, p32 in zip(mine, masters):
        p32.grad.copy_(p.grad)
    torch.testing.assert_close(utils.clip_grad_norm_(masters, 0.0), want, atol=1e-5, rtol=1e-5)

    # the masters' optimizer state is saved complete (rank 0 holds every expert's moments)
    opt_full, opt_mine = torch.optim.Adam(full, lr=0.01), torch.optim.Adam(masters, lr=0.01)
    opt_full.step()
    opt_mine.step()
    opt_mine.consolidate_state_dict()
    if rank == 0:
        saved, expected = opt_mine.state_dict(), opt_full.state_dict()
        for i in expected["state"]:
            for k, v in expected["state"][i].items():
                torch.testing.assert_close(saved["state"][i][k], v, atol=1e-6, rtol=1e-4, msg=f"param {i} {k}")

    # fairseq's FP16Optimizer over these masters: an overflow in rank 1's expert is an overflow on
    # every worker (the norm, all-reduced, is inf everywhere), so all skip and lower the loss scale
    from fairseq.optim.fp16_optimizer import FP16Optimizer as FP16

    cfg = argparse.Namespace(optimizer=None, common=argparse.Namespace(
        fp16_scale_window=128, fp16_init_scale=16.0, fp16_scale_tolerance=0.0, threshold_loss_scale=None,
        min_loss_scale=1e-4, bf16=False))
    masters = FP16.build_fp32_params(None, mine, flatten=False)
    opt = FP16(cfg, mine, _Adam.build(masters), masters)
    grads = [p.grad.clone() for p in mine]
    before = [p.detach().clone() for p in mine]
    if rank == 1:
        next(p for p in mine if getattr(p, "expert", False)).grad.view(-1)[0] = math.inf
    opt._needs_sync = True  # as its backward() leaves it
    with pytest.raises(OverflowError):
        opt.clip_grad_norm(0.0)
    opt.zero_grad()
    assert opt.scaler.loss_scale == 8.0  # halved on every worker
    for p, g in zip(mine, grads):
        p.grad = g * opt.scaler.loss_scale  # as a backward of the scaled loss leaves them
    opt._needs_sync = True
    torch.testing.assert_close(opt.clip_grad_norm(0.0), want, atol=1e-4, rtol=1e-5)  # unscaled: one process's
    opt.step()
    dense = torch.cat([p.detach().view(-1) for p in mine if not getattr(p, "expert", False)])
    assert not torch.equal(dense, torch.cat([b.view(-1) for p, b in zip(mine, before) if not getattr(p, "expert", False)]))
    gathered = [torch.zeros_like(dense) for _ in range(world)]
    dist.all_gather(gathered, dense)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "dense weights differ between workers"


class _Adam:
    """A FairseqOptimizer over torch's Adam (built lazily: fairseq imports are heavy)."""

    @staticmethod
    def build(params):
        from fairseq.optim import FairseqOptimizer

        class Adam(FairseqOptimizer):
            def __init__(self, params):
                super().__init__(None)
                self._optimizer = torch.optim.Adam(params, lr=0.01)

        return Adam(params)


def _check_amp_skip(rank, world):
    from fairseq.optim.amp_optimizer import AMPOptimizer

    from fairseq_evomoe import patches

    patches.install_for_expert_parallelism()
    layer, par, mine, full = _grads(rank, world)
    cfg = argparse.Namespace(optimizer=None, common=argparse.Namespace(fp16_init_scale=4.0, amp_scale_window=None,
                                                                          min_loss_scale=1e-4))
    opt = AMPOptimizer(cfg, mine, _Adam.build(mine))
    opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # fairseq's is CUDA's (disabled on CPU)
    grads = [p.grad.clone() for p in mine]

    def scaled(overflow_on):  # the gradients a scaled loss's backward leaves
        opt.scaler.scale(torch.ones(()))
        for p, g in zip(mine, grads):
            p.grad = g * opt.scaler.get_scale()
        if rank == overflow_on:
            next(p for p in mine if getattr(p, "expert", False)).grad.view(-1)[0] = math.inf

    before = [p.detach().clone() for p in mine]
    scaled(overflow_on=1)
    gnorm = opt.clip_grad_norm(0.0)
    assert not torch.isfinite(gnorm)
    opt.step()
    for p, b in zip(mine, before):  # every worker skipped, rank 0 too (its own gradients were finite)
        assert torch.equal(p.detach(), b)
    assert opt.scaler.get_scale() == 2.0  # backed off alike

    scaled(overflow_on=None)
    assert torch.isfinite(opt.clip_grad_norm(0.0))
    opt.step()
    assert opt.scaler.get_scale() == 2.0
    dense = torch.cat([p.detach().view(-1) for p in layer.gate.parameters()])
    assert not torch.equal(dense, torch.cat([b.view(-1) for p, b in zip(mine, before) if not getattr(p, "expert", False)]))
    gathered = [torch.zeros_like(dense) for _ in range(world)]
    dist.all_gather(gathered, dense)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "dense weights differ between workers"


def test_fp16_master_copies_count_every_expert_once_and_save_complete_state():
    _spawn(2, [("fp16 masters", _check_fp16_masters)])


def test_amp_overflow_in_one_workers_expert_is_skipped_by_every_worker():
    _spawn(2, [("amp skip", _check_amp_skip)])


def _check_refusals(rank, world):
    from fairseq_evomoe.models.model_checks import check_expert_parallel_options

    base = dict(moe_freq=2, encoder_layerdrop=0, decoder_layerdrop=0, optimizer="adam")
    with pytest.raises(ValueError, match=r"--ddp-backend fully_sharded cannot be used with expert parallelism over 2 workers.*c10d"):
        check_expert_parallel_options(argparse.Namespace(**base, ddp_backend="fully_sharded"))
    with pytest.raises(ValueError, match=r"--fp16 with expert parallelism over 2 workers needs --fp16-no-flatten-grads.*--memory-efficient-fp16"):
        check_expert_parallel_options(argparse.Namespace(**base, fp16=True))
    # fairseq never flattens under --bf16 (it sets fp16 too)
    for ok in (dict(fp16=True, fp16_no_flatten_grads=True), dict(fp16=True, memory_efficient_fp16=True),
               dict(fp16=True, amp=True), dict(fp16=True, bf16=True), dict(bf16=True, memory_efficient_bf16=True),
               dict(ddp_backend="c10d")):
        check_expert_parallel_options(argparse.Namespace(**base, **ok))


def test_modes_that_cannot_work_are_refused_naming_the_flag():
    _spawn(2, [("refusals", _check_refusals)])


# ------------------------------------------------------------------------------------------
# the real fairseq-train: --fp16 --fp16-no-flatten-grads on 2 gloo workers vs 1 process
# ------------------------------------------------------------------------------------------


def _checked_torchrun(*args, timeout=300):
    """fairseq-train on 2 workers with fairseq's gradient-norm consistency check on (checked_train.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import python_for_scripts
    from test_expert_parallel import REPO, _free_port

    script = Path(__file__).with_name("checked_train.py")
    cmd = [python_for_scripts(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "--no-python", python_for_scripts(), str(script), *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-6000:]}"
    assert log.count("gradient-norm consistency check on") == 2, log[-3000:]
    return log


def test_cli_fp16_two_workers_agree_match_one_process_and_resume_without_reset(mt_data, tmp_path):
    from conftest import run_cli
    from test_expert_parallel import TRAIN_ARGS, _curve, _optimizer_state

    # fp16 matmuls are emulated on CPU (5x fp32's time): small batches keep the test short
    fp16 = ["--fp16", "--fp16-no-flatten-grads", "--fp16-init-scale", "16", "--max-update", "4", "--max-tokens", "300"]
    dist_args = ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    two, one = tmp_path / "w2", tmp_path / "w1"
    log2 = _checked_torchrun(mt_data, *TRAIN_ARGS, *fp16, *dist_args, "--save-dir", two)
    p1 = run_cli("fairseq-train", mt_data, *TRAIN_ARGS, *fp16, "--update-freq", "2", "--save-dir", one)
    loss2, gnorm2, _ = _curve(log2)
    loss1, gnorm1, _ = _curve(p1.stdout + p1.stderr)
    assert len(loss1) == 4 and loss2[:4] == pytest.approx(loss1, abs=1e-2), (loss2, loss1)
    # every worker's norm passed fairseq's consistency check; they equal one process's (fp16 rounding)
    assert gnorm2[:4] == pytest.approx(gnorm1, rel=2e-3), (gnorm2, gnorm1)

    # the checkpoint holds the fp32 masters' Adam moments of every expert, as one process has them
    (o2, n2), (o1, n1) = _optimizer_state(two / "checkpoint_last.pt"), _optimizer_state(one / "checkpoint_last.pt")
    assert n2 == n1 == 4 and o2.keys() == o1.keys()
    for i in o1:
        assert o2[i]["exp_avg"].shape == o1[i]["exp_avg"].shape, i

    # ... so the run resumes without --reset-optimizer, on 1 process or 2 workers, like the 1-process run
    more = ["--max-update", "6", "--reset-dataloader"]
    r1 = run_cli("fairseq-train", mt_data, *TRAIN_ARGS, *fp16, "--update-freq", "2", "--save-dir", tmp_path / "r1",
                 "--restore-file", one / "checkpoint_last.pt", *more)
    r21 = run_cli("fairseq-train", mt_data, *TRAIN_ARGS, *fp16, "--update-freq", "2", "--save-dir", tmp_path / "r21",
                  "--restore-file", two / "checkpoint_last.pt", *more)
    r22 = _checked_torchrun(mt_data, *TRAIN_ARGS, *fp16, *dist_args, "--save-dir", tmp_path / "r22",
                            "--restore-file", two / "checkpoint_last.pt", *more)
    want = _curve(r1.stdout + r1.stderr)[0]
    assert len(want) == 2
    for name, log in (("2 workers -> 1 process", r21.stdout + r21.stderr), ("2 workers -> 2 workers", r22)):
        assert _curve(log)[0] == pytest.approx(want, abs=1e-2), (name, _curve(log)[0], want)


def test_cli_memory_efficient_fp16_two_workers_agree_and_match_one_process(mt_data, tmp_path):
    from conftest import run_cli
    from test_expert_parallel import TRAIN_ARGS, _curve

    mefp16 = ["--memory-efficient-fp16", "--fp16-init-scale", "16", "--max-update", "3", "--no-save", "--max-tokens", "300"]
    log2 = _checked_torchrun(mt_data, *TRAIN_ARGS, *mefp16, "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp")
    p1 = run_cli("fairseq-train", mt_data, *TRAIN_ARGS, *mefp16, "--update-freq", "2")
    (loss2, gnorm2, _), (loss1, gnorm1, _) = _curve(log2), _curve(p1.stdout + p1.stderr)
    assert len(gnorm1) == 3 and gnorm2[:3] == pytest.approx(gnorm1, rel=2e-2), (gnorm2, gnorm1)
    assert loss2[:3] == pytest.approx(loss1, abs=1e-2)
