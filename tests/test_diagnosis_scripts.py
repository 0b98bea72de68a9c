"""The diagnosis scripts on real checkpoints of a tiny EvoMoE GPT trained through fairseq-train:
scripts/spawn_scale.py on the checkpoint written just before the spawn, scripts/evaluate_routing.py
on the final one (hard phase)."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, USER_DIR, built_once, python_for_scripts, run_cli

pytestmark = pytest.mark.slow  # trains with fairseq-train


@pytest.fixture(scope="session")
def evomoe_checkpoints(lm_data, tmp_path_factory):
    """Spawn at update 4, tau 2.0 -> 0.5 by update 8, top-1 from 8 by the Gumbel-max sample (so that
    training's rule and evaluation's differ); checkpoints at 4 (before the spawn: it happens before
    the step of update 5) and 10 (hard phase)."""
    def build(save):
        run_cli("fairseq-train", lm_data, "--user-dir", USER_DIR, "--cpu", "--seed", "1", "--task", "evomoe_language_modeling",
                "--arch", "transformer_lm_evomoe_tiny", "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64",
                "--max-tokens", "512", "--optimizer", "adam", "--lr", "2e-3", "--max-update", "10", "--num-workers", "0",
                "--evomoe-diversify-updates", "4", "--dts-anneal-updates", "4", "--dts-hard-update", "8",
                "--dts-hard-routing", "sample", "--save-dir", save, "--save-interval-updates", "4", "--keep-interval-updates", "-1",
                "--no-epoch-checkpoints", "--disable-validation")
    save = built_once(tmp_path_factory, "evomoe_ckpt", build)
    return save / "checkpoint_1_4.pt", save / "checkpoint_last.pt"


def script(name, *args, check=True):
    proc = subprocess.run([python_for_scripts(), str(REPO / "scripts" / name), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_spawn_scale_per_mode(lm_data, evomoe_checkpoints, tmp_path):
    before, _ = evomoe_checkpoints
    out = tmp_path / "scale.json"
    proc = script("spawn_scale.py", lm_data, "--path", before, "--max-batches", "3", "--json", out)
    r = json.loads(out.read_text())
    assert set(r["modes"]) == {"mask", "mask-rescale", "reinit", "noise", "copy"} and r["layers"]
    for routing in ("soft", "top1"):
        copies = r["modes"]["copy"][routing]
        # copies of the base expert mixed by weights that sum to at most 1: the top-1 output is the base
        # expert's times p_max (<= 1); the soft mixture's weights sum to < 1 where experts fail the threshold
        assert all(0 < v <= 1.0 + 1e-6 for v in copies), copies
        # zeroing half of each matrix shrinks the output; rescaling by 1/(1-r) undoes part of it
        assert all(m < c for m, c in zip(r["modes"]["mask"][routing], copies))
        assert all(m < s for m, s in zip(r["modes"]["mask"][routing], r["modes"]["mask-rescale"][routing]))
    # the spawned layer routes: top-1 weights each token's output by p_max < 1 of a fresh gate, the soft
    # phase at tau_max mixes (nearly) every expert with weights summing to (nearly) 1
    assert all(t < s for t, s in zip(r["modes"]["copy"]["top1"], r["modes"]["copy"]["soft"]))
    assert "mask-rescale" in proc.stdout


def test_spawn_scale_refuses_a_spawned_checkpoint(lm_data, evomoe_checkpoints):
    _, after = evomoe_checkpoints
    proc = script("spawn_scale.py", lm_data, "--path", after, check=False)
    assert proc.returncode != 0 and "before the spawn" in proc.stderr


def test_evaluate_routing_three_ways(lm_data, evomoe_checkpoints, tmp_path):
    _, last = evomoe_checkpoints
    out = tmp_path / "routing.json"
    script("evaluate_routing.py", lm_data, "--path", last, "--draws", "2", "--max-batches", "4", "--json", out)
    r = json.loads(out.read_text())
    assert r["phase"] == 2
    for routing in ("argmax", "sample", "softmax"):
        assert 0 < r[routing]["loss"] < 20 and r[routing]["ppl"] == pytest.approx(2 ** r[routing]["loss"])
    assert 0 < r["sample"]["hard_eval_agree_pct"] <= 100 and len(r["sample"]["hard_eval_agree_pct_per_layer"]) >= 1
    assert "hard_eval_agree_pct" not in r["argmax"]
    # three routings of the same weights give three different losses
    assert len({round(r[k]["loss"], 6) for k in ("argmax", "sample", "softmax")}) == 3


def test_evaluate_routing_refuses_a_checkpoint_before_the_spawn(lm_data, evomoe_checkpoints):
    before, _ = evomoe_checkpoints
    proc = script("evaluate_routing.py", lm_data, "--path", before, check=False)
    assert proc.returncode != 0 and "before the spawn" in proc.stderr


def test_summarize_tables_the_router_by_phase_and_filters_seeds(tmp_path):
    """benchmarks/diagnosis/summarize.py: router statistics per phase from each run's training log
    (kept as router.json), mean ± std per gate over the chosen seeds, with the test perplexity of
    the runs evaluate_test.py evaluated; runs moved aside are left out; translation shows BLEU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize", REPO / "benchmarks" / "diagnosis" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)

    def run(task, gate, name, metric, std_soft, std_hard):
        d = tmp_path / task / gate / name
        d.mkdir(parents=True)
        seed = int(name[4:].split(".")[0])
        (d / "result.json").write_text(json.dumps({"seed": seed, "ppl" if task == "lm" else "bleu": metric,
                                                   "final_valid_loss": metric / 10,
                                                   "train_curve": {"moe_expert_compute": [1e6, 2e6]}}))
        lines = [{"num_updates": u, "loss": 5.0, "moe_phase": phase, "moe_router_logit_std": std}
                 for u, phase, std in ((10, 1, std_soft), (20, 1, std_soft + 0.2), (30, 2, std_hard))]
        (d / "train.log").write_text("".join(json.dumps(r) + "\n" for r in lines))

    run("lm", "evomoe", "seed1", 50.0, 1.0, 2.0)
    run("lm", "evomoe", "seed2", 52.0, 1.2, 2.2)
    run("lm", "evomoe", "seed4", 60.0, 3.0, 4.0)
    run("lm", "evomoe", "seed1.previous-20261207-010000", 99.0, 9.0, 9.0)
    run("mt", "evomoe", "seed1", 33.0, 1.0, 2.0)
    (tmp_path / "lm" / "evomoe" / "seed2" / "test.json").write_text(json.dumps({"ppl": 47.5}))

    rows = summarize.collect(tmp_path, "lm", seeds={1, 2})
    assert [r["seed"] for r in rows["evomoe"]] == [1, 2]
    assert json.loads((tmp_path / "lm" / "evomoe" / "seed1" / "router.json").read_text()) == {
        "1": {"logit_std": pytest.approx(1.1)}, "2": {"logit_std": 2.0}}
    line = summarize.table(rows).splitlines()[2]
    assert line.startswith("| evomoe | 1, 2 | 51.00 ± 1.41 | 47.50 (1 seed) | 5.100 ± 0.141 | 2.000 ± 0.000 | 1.200 ± 0.141 |")
    assert [r["seed"] for r in summarize.collect(tmp_path, "lm")["evomoe"]] == [1, 2, 4]  # not the run moved aside
    assert summarize.collect(tmp_path, "lm", seeds={4})["evomoe"][0]["metric"] == 60.0
    assert "test BLEU" in summarize.table(summarize.collect(tmp_path, "mt"), "mt")


def test_evaluate_test_writes_the_test_perplexity_of_finished_runs(tmp_path, monkeypatch, capsys):
    """benchmarks/diagnosis/evaluate_test.py: scripts/evaluate_lm.sh on the test split of each finished
    run with a kept checkpoint, with the run's block length and task, on the data the store prepared
    for it (here a stand-in that writes the script's JSON); runs without a checkpoint are named as
    skipped, runs already evaluated are left alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_test", REPO / "benchmarks" / "diagnosis" / "evaluate_test.py")
    evaluate_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_test)

    data_settings = {"corpus": "wikitext-2", "spm_vocab": 4000, "train_lines": "all", "eval_lines": "all"}
    for name, vocab in (("wikitext-2_spm500", 500), ("wikitext-2_spm4000", 4000)):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "settings.json").write_text(
            json.dumps({"settings": dict(data_settings, spm_vocab=vocab), "complete": True}))

    def run(seed, checkpoint=True, tested=False):
        d = tmp_path / "lm" / "evomoe" / f"seed{seed}"
        (d / "ckpt").mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"seed": seed, "ppl": 50.0}))
        (d / "settings.json").write_text(json.dumps({"seed": seed, "data": data_settings, "tokens_per_sample": 64,
                                                     "fairseq_task": "evomoe_language_modeling"}))
        if checkpoint:
            (d / "ckpt" / "checkpoint_last.pt").write_text("weights")
        if tested:
            (d / "test.json").write_text(json.dumps({"ppl": 1.0}))
        return d

    calls, real_run = [], subprocess.run

    def evaluate_lm(cmd, **kw):  # what scripts/evaluate_lm.sh writes (git, for the commit, runs)
        if not str(cmd[1]).endswith("evaluate_lm.sh"):
            return real_run(cmd, **kw)
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "ppl.test.json").write_text(json.dumps({"loss_base2": 5.5, "ppl": 45.25, "tokens": 1000}))

    monkeypatch.setattr(evaluate_test.subprocess, "run", evaluate_lm)
    evaluated, without_checkpoint, tested = run(1), run(2, checkpoint=False), run(3, tested=True)
    run(4)  # another gate's seed filter
    evaluate_test.main(["--store", str(tmp_path), "--gates", "evomoe", "--seeds", "1,2,3"])

    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[1].endswith("scripts/evaluate_lm.sh")
    opt = lambda flag: cmd[cmd.index(flag) + 1]
    assert opt("--subset") == "test" and opt("--tokens-per-sample") == "64" and opt("--task") == "evomoe_language_modeling"
    assert opt("--data-bin") == str(tmp_path / "data" / "wikitext-2_spm4000" / "bin")
    assert opt("--checkpoint") == str(evaluated / "ckpt" / "checkpoint_last.pt")
    result = json.loads((evaluated / "test.json").read_text())
    assert result == {"loss_base2": 5.5, "ppl": 45.25, "tokens": 1000, "checkpoint": "ckpt/checkpoint_last.pt",
                      "commit": result["commit"]} and result["commit"]
    out = capsys.readouterr().out
    assert f"skipped (no checkpoint kept): {without_checkpoint}" in out and "evomoe seed 1: test ppl 45.25" in out
    assert not (without_checkpoint / "test.json").exists()
    assert json.loads((tested / "test.json").read_text()) == {"ppl": 1.0}
