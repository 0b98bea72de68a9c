"""EvoMoE's phases under expert parallelism (2 CPU workers, gloo, the real fairseq-train CLI).

1. Expert-diversify then spawn, with a deterministic top-1 gate after the spawn: 2 workers follow the
   loss and gradient-norm curves of one process (the base expert is held by both workers and averaged like a dense
   weight; the spawn is seeded by global expert id, so both workers spawn what one process would).
2. The DTS gate with its dynamic number of experts per token runs every phase on 2 workers, and
   the checkpoint generates in one process.
3. A checkpoint from before the spawn, written by one process, resumed on 2 workers (layer level):
   every worker runs the checkpoint's base expert, with its optimizer moments, and a spawn right
   after the resume gives every expert those moments.
"""

import copy
from dataclasses import replace

import pytest
import torch

from conftest import json_logs, run_cli, translate_test_set
from test_expert_parallel import TRAIN_ARGS, _curve, _load, _spawn, _torchrun

DIST = ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]

pytestmark = pytest.mark.slow  # every test spawns worker processes (torchrun, torch.multiprocessing)


def with_overrides(args, **overrides):
    """TRAIN_ARGS with some option values replaced (keys as option names without the dashes)."""
    out = list(args)
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


def test_diversify_and_spawn_match_one_process(mt_data, tmp_path):
    args = with_overrides(TRAIN_ARGS, task="evomoe_translation", moe_gate="top1", evomoe_diversify_updates=3,
                          max_update=6)
    p2 = _torchrun(mt_data, *args, *DIST, "--save-dir", tmp_path / "w2")
    log2 = p2.stdout + p2.stderr
    assert "distributed init (rank 1)" in log2 and "EvoMoE: spawned 4 experts" in log2
    p1 = run_cli("fairseq-train", mt_data, *args, "--update-freq", "2", "--save-dir", tmp_path / "w1")
    loss2, gnorm2, valid2 = _curve(log2)
    loss1, gnorm1, valid1 = _curve(p1.stdout + p1.stderr)
    assert len(loss1) == 6
    assert loss2[:6] == pytest.approx(loss1, abs=2e-3), (loss2, loss1)  # before, at and after the spawn
    # the gradient norm (clipped at --clip-norm) counts the shared base expert once, then every expert once
    assert gnorm2[:6] == pytest.approx(gnorm1, rel=1e-3), (gnorm2, gnorm1)
    assert valid2[0] == pytest.approx(valid1[0], abs=2e-3)
    m2, m1 = _load(tmp_path / "w2" / "checkpoint_last.pt")["model"], _load(tmp_path / "w1" / "checkpoint_last.pt")["model"]
    key = "decoder.layers.1.moe.experts.fc1_weight"
    assert bool(m2["decoder.layers.1.moe.spawned"]) and m2[key].shape == m1[key].shape
    assert (m2[key] - m1[key]).abs().max() < 1e-3
    assert (m2[key][0] != m2[key][1]).any(), "the spawned experts differ"


def test_dts_phases_run_on_two_workers(mt_data, tmp_path):
    args = with_overrides(TRAIN_ARGS, task="evomoe_translation", arch="transformer_evomoe_tiny", moe_gate="dts",
                          evomoe_diversify_updates=2, dts_anneal_updates=3, dts_hard_update=5, dts_tau_min=0.1,
                          max_update=7)
    p2 = _torchrun(mt_data, *args, *DIST, "--save-dir", tmp_path / "w2")
    rows = {int(r["num_updates"]): r for r in json_logs(p2, "train_inner")}
    assert [rows[n]["moe_phase"] for n in (1, 2, 3, 6, 7)] == [0, 0, 1, 2, 2]
    assert rows[3]["moe_experts_per_token"] > 2.0  # soft routing: several experts per token, dropless
    assert rows[7]["moe_experts_per_token"] == 1.0
    translate_test_set(mt_data, tmp_path / "w2" / "checkpoint_last.pt")


def _check_resume_before_spawn(rank, world):
    from moe_helpers import make_layer

    from fairseq_evomoe.evomoe.expert_diversify import DiversifyingMoELayer, load_base_expert_state
    from fairseq_evomoe.evomoe.spawn import SpawnSettings, spawn_optimizer_state
    from fairseq_evomoe.models.moe_stack import distribute_experts
    from fairseq_evomoe.moe.parallel import optimizer_state
    from fairseq_evomoe.moe.parallel.placement import ExpertPlacement

    # one process in the expert-diversify phase: an Adam step trains the base expert (slot 0) only
    settings = SpawnSettings("mask", 0.5, seed=1)
    ref = make_layer(gate="top1", num_experts=4, dim=8, ffn=16, seed=3, diversify=True)
    ref.plan = replace(ref.plan, spawn=settings)
    ref.layer_name = "dec1"
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    ref_opt = torch.optim.Adam(list(ref.gate.parameters()) + list(ref.experts.parameters()), lr=0.01)
    ref.base_expert_forward(x).pow(2).sum().backward()
    ref_opt.step()
    model_sd, opt_sd = copy.deepcopy(ref.state_dict()), copy.deepcopy(ref_opt.state_dict())

    def resumed():  # built as build_moe_layer builds it on 2 workers, then --restore-file
        par = ExpertPlacement.from_environment(4)
        layer = DiversifyingMoELayer(copy.deepcopy(ref.gate), distribute_experts(copy.deepcopy(ref.experts), par),
                                     ref.plan, padding_idx=ref.padding_idx, placement=par)
        layer.layer_name = "dec1"
        layer.load_state_dict(model_sd)
        opt = torch.optim.Adam(list(layer.gate.parameters()) + list(layer.experts.parameters()), lr=0.01)
        opt.load_state_dict(opt_sd)  # fairseq broadcasts the full [E, ...] state
        return layer, opt

    base_moments = {k: v[0] for k, v in ref_opt.state[ref.experts.fc1_weight].items() if k != "step"}

    # resumed within the diversify phase: every worker's slots hold the base expert and its moments
    layer, opt = resumed()
    with torch.no_grad():
        torch.testing.assert_close(layer.base_expert_forward(x), ref.base_expert_forward(x))
    assert torch.equal(layer.experts.fc1_weight, ref.experts.fc1_weight[0:1].expand_as(layer.experts.fc1_weight))
    load_base_expert_state(layer, opt)  # what the evomoe task's controller runs before a train step
    optimizer_state.before_step(opt, (), {})  # what torch runs at opt.step(): keep the local slice
    for key, want in base_moments.items():
        got = opt.state[layer.experts.fc1_weight][key]
        assert all(torch.equal(g, want) for g in got), key

    # resumed at T_div: the evomoe task spawns before the first step, with the full state still loaded
    layer, opt = resumed()
    ref.spawn()
    assert spawn_optimizer_state(ref, ref_opt)
    load_base_expert_state(layer, opt)
    layer.spawn()
    assert spawn_optimizer_state(layer, opt)
    optimizer_state.before_step(opt, (), {})
    local = list(layer.placement.local_experts)
    torch.testing.assert_close(layer.experts.fc1_weight, ref.experts.fc1_weight[local])
    for key in base_moments:
        torch.testing.assert_close(opt.state[layer.experts.fc1_weight][key], ref_opt.state[ref.experts.fc1_weight][key][local])


def test_checkpoint_from_before_the_spawn_resumes_on_two_workers():
    _spawn(2, [("resume before the spawn", _check_resume_before_spawn)])
