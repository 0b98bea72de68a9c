"""The reproduction kit's scripts on the shipped corpora (small slices, no download): data
preparation, argument errors, translation evaluation, the gate comparison at a minimal setting,
and the routing plots on the real training log that comparison writes."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, built_once, python_for_scripts, script_env, shared_data_dir, tool_path

SCRIPTS = REPO / "scripts"
BENCHMARKS = REPO / "benchmarks"  # the comparison harness and benchmarks


def sh(script, *args, check=True, timeout=300):
    env = script_env(PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                     PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    path = BENCHMARKS / script if (BENCHMARKS / script).exists() else SCRIPTS / script
    cmd = ["bash", str(path), *map(str, args)] if script.endswith(".sh") else [python_for_scripts(), str(path), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def lines(p):
    with open(p, encoding="utf-8") as f:
        return sum(1 for _ in f)


# ---------------------------------------------------------------------------------------- data

@pytest.mark.slow  # runs sentencepiece and fairseq-preprocess on real data
def test_prepare_multi30k_sentencepiece(tmp_path):
    out = tmp_path / "m30k"
    proc = sh("prepare_multi30k.sh", "--data-dir", shared_data_dir(), "--out-dir", out, "--train-lines", 600,
              "--valid-lines", 50, "--test-lines", 40, "--spm-vocab", 600)
    assert (out / "spm.model").is_file()
    for split, n in (("train", 600), ("valid", 50), ("test", 40)):
        assert lines(out / "raw" / f"{split}.en") == n and lines(out / "spm" / f"{split}.de") == n
        assert (out / "bin" / f"{split}.de-en.de.bin").is_file()
    # raw references stay untokenised (what sacrebleu scores against); the encoded text has pieces
    first_raw = (out / "raw" / "test.en").read_text(encoding="utf-8").splitlines()[0]
    first_spm = (out / "spm" / "test.en").read_text(encoding="utf-8").splitlines()[0]
    assert "▁" not in first_raw and "▁" in first_spm
    assert (out / "bin" / "dict.de.txt").read_text() == (out / "bin" / "dict.en.txt").read_text()  # joined
    assert "binary data" in proc.stdout and "%|" in proc.stderr  # result summary + progress bars


@pytest.mark.slow  # runs sentencepiece and fairseq-preprocess on real data
def test_prepare_wikitext_word_level(tmp_path):
    out = tmp_path / "wt"
    sh("prepare_wikitext.sh", "--data-dir", shared_data_dir(), "--out-dir", out, "--train-lines", 400,
       "--valid-lines", 40, "--test-lines", 40)
    assert lines(out / "raw" / "train.txt") == 400
    for split in ("train", "valid", "test"):
        assert (out / "bin" / f"{split}.bin").is_file()
    words = {l.split()[0] for l in (out / "bin" / "dict.txt").read_text(encoding="utf-8").splitlines()}
    assert "the" in words and "@-@" in words  # word-level WikiText tokens, no subwords
    # again with other settings: the first dictionary (a model trained on it needs it) is kept
    first = (out / "bin" / "dict.txt").read_text(encoding="utf-8")
    proc = sh("prepare_wikitext.sh", "--data-dir", shared_data_dir(), "--out-dir", out, "--train-lines", 200,
              "--valid-lines", 40, "--test-lines", 40)
    kept = list(out.glob("previous-*/bin/dict.txt"))
    assert len(kept) == 1 and kept[0].read_text(encoding="utf-8") == first
    assert f"was moved to {kept[0].parent.parent}" in proc.stderr
    assert (out / "bin" / "dict.txt").read_text(encoding="utf-8") != first


@pytest.mark.slow  # runs sentencepiece and fairseq-preprocess on real data
def test_prepare_wmt17_local_mode(tmp_path):
    """--raw-dir on the shipped WMT sample (Moses-tokenised, escaped) + newstest2014 as the test set."""
    data = shared_data_dir()
    out = tmp_path / "wmt"
    sh("prepare_wmt17_en_de.sh", "--raw-dir", data / "wmt-ende-sample10k", "--test-prefix",
       data / "wmt14-newstest2014-de-en" / "newstest2014", "--out-dir", out, "--train-lines", 1500,
       "--spm-vocab", 800, "--workers", 1)
    n_train = lines(out / "raw" / "train.en")
    assert 1000 < n_train <= 1500 and lines(out / "raw" / "train.de") == n_train  # cleaned, still aligned
    train = (out / "raw" / "train.en").read_text(encoding="utf-8")
    assert "&apos;" not in train and "&quot;" not in train  # Moses escapes undone
    assert lines(out / "raw" / "test.de") == 3003 and lines(out / "raw" / "valid.en") == 50  # eval sets kept whole
    assert (out / "bin" / "test.en-de.de.bin").is_file() and (out / "spm.model").is_file()


@pytest.mark.parametrize("script", ["prepare_multi30k.sh", "prepare_wikitext.sh", "prepare_wmt17_en_de.sh",
                                    "evaluate_translation.sh", "evaluate_lm.sh", "quickstart.sh", "prepare_glue.sh",
                                    "finetune_glue.sh"])
def test_shell_scripts_reject_bad_options(script):
    positional = ("rte", "checkpoint.pt") if script == "finetune_glue.sh" else ()
    proc = sh(script, *positional, "--no-such-option", check=False)
    assert proc.returncode != 0 and "--no-such-option" in proc.stderr and "Usage" in proc.stderr
    assert sh(script, "--help").stdout.startswith("Usage")
    text = (SCRIPTS / script).read_text()
    assert "set -euo pipefail" in text


def test_clear_errors_name_the_option(tmp_path):
    assert "--train-lines must be a non-negative integer" in sh("prepare_wikitext.sh", "--train-lines", "ten", check=False).stderr
    assert "--spm-vocab needs a value" in sh("prepare_multi30k.sh", "--spm-vocab", check=False).stderr
    assert "--raw-dir" in sh("prepare_wmt17_en_de.sh", "--raw-dir", tmp_path / "missing", check=False).stderr
    assert "--checkpoint is required" in sh("evaluate_lm.sh", "--data-bin", tmp_path, check=False).stderr
    err = sh("compare_gates.py", "--gates", "switch,nonsense", "--dry-run", check=False).stderr
    assert "unknown gate 'nonsense'" in err
    for script, args in [("prepare_glue.sh", ["--task", "FOO", "--dict", tmp_path / "d", "--tsv-dir", tmp_path]),
                         ("finetune_glue.sh", ["FOO", tmp_path / "ckpt"])]:
        proc = sh(script, *args, check=False)  # stops at the task, not at a later step
        assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
            "--task 'FOO' is not a GLUE task this script knows; choose one of: CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE"]


def test_finetune_glue_refuses_a_checkpoint_inside_its_save_dir(tmp_path):
    """The save dir's earlier fine-tune is moved aside before training: a checkpoint inside it would
    go with it, and fairseq would fine-tune a random model. Refused, and nothing is moved."""
    save = tmp_path / "glue" / "RTE"
    save.mkdir(parents=True)
    (save / "checkpoint_best.pt").write_text("a model")
    (tmp_path / "bin" / "input0").mkdir(parents=True)
    (tmp_path / "bin" / "input0" / "dict.txt").write_text("a 1\n")
    proc = sh("finetune_glue.sh", "RTE", save / ".." / "RTE" / "checkpoint_best.pt", "--data", tmp_path / "bin",
              "--save-dir", save, check=False)
    assert proc.returncode != 0 and "is inside --save-dir" in proc.stderr and "give another --save-dir" in proc.stderr
    assert [p.name for p in (tmp_path / "glue").iterdir()] == ["RTE"]
    assert (save / "checkpoint_best.pt").read_text() == "a model"


def test_move_aside_keeps_what_an_earlier_run_saved(tmp_path):
    """The scripts never overwrite an earlier run's folder: it is renamed next to itself, twice in the
    same second included."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint_best.pt").write_text("earlier")
    cmd = f'source "{SCRIPTS / "_common.sh"}"; move_aside "{tmp_path / "run"}"; mkdir "{tmp_path / "run"}"; move_aside "{tmp_path / "run"}"'
    moved = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout.split()
    assert len(set(moved)) == 2 and all(".previous-" in m for m in moved)
    assert (Path(moved[0]) / "checkpoint_best.pt").read_text() == "earlier" and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- evaluation

@pytest.mark.slow
def test_evaluate_translation_bleu(mt_data, tiny_mt_checkpoint, tmp_path):
    """fairseq-generate (beam 5) + sacrebleu on a tiny Multi30k model (whitespace tokens: --post-process none)."""
    ckpt = tiny_mt_checkpoint[0]
    ref = shared_data_dir() / "multi30k" / "test_2016_flickr.en"
    proc = sh("evaluate_translation.sh", "--data-bin", mt_data, "--checkpoint", ckpt / "checkpoint_last.pt",
              "--task", "translation", "--post-process", "none", "--ref", ref, "--max-len-a", "1", "--max-len-b", "5", "--out-dir", tmp_path / "ev")
    res = json.loads((tmp_path / "ev" / "bleu.test.json").read_text())
    assert res["name"] == "BLEU" and 0 <= res["score"] <= 100
    assert lines(tmp_path / "ev" / "hyp.test.detok.txt") == 100
    assert "BLEU (test, sacrebleu, detokenised)" in proc.stdout
    assert "first 100 of 1000 reference lines" in proc.stderr


# ---------------------------------------------------------------------------------------- comparison + plots

@pytest.fixture(scope="session")
def comparison(tmp_path_factory):
    """(work dir, output) of a minimal comparison: switch and evomoe, one seed, 12 updates."""
    def build(work):
        proc = sh("compare_gates.py", "--tasks", "lm", "--gates", "switch,evomoe", "--seeds", "1", "--updates", 12,
                  "--train-lines", 300, "--eval-lines", 40, "--spm-vocab", 500, "--max-tokens", 512,
                  "--validations", 3, "--max-valid-steps", 2, "--work-dir", work, "--results", work / "results.md",
                  "--jobs", 2, timeout=600)
        (work / "compare.out").write_text(proc.stdout)
    work = built_once(tmp_path_factory, "compare", build)
    return work, (work / "compare.out").read_text()


@pytest.mark.slow  # the comparison fixture trains with fairseq-train
def test_compare_gates_minimal(comparison):
    work, _ = comparison
    report = (work / "results.md").read_text()
    assert "| switch |" in report and "| evomoe |" in report
    assert "spawn mode `mask`" in report and "temperature schedule `linear`" in report
    for gate in ("switch", "evomoe"):
        res = json.loads((work / "lm" / gate / "seed1" / "result.json").read_text())
        assert res["updates"] == 12 and res["ppl"] > 1 and len(res["valid_loss"]) >= 3 and res["train_wall_s"] > 0
    evo = json.loads((work / "lm" / "evomoe" / "seed1" / "result.json").read_text())
    sw = json.loads((work / "lm" / "switch" / "seed1" / "result.json").read_text())
    assert sw["experts_per_token"] == pytest.approx(1.0)
    assert evo["experts_per_token"] > 1.0  # the dense-to-sparse phase routes tokens to several experts
    assert (work / "results_plots" / "lm" / "routing.png").stat().st_size > 10_000
    assert (work / "results_plots" / "lm" / "around_switch.png").stat().st_size > 10_000
    assert "expert compute there, x Switch's total" in report and "the target" in report
    assert "Around the switch to top-1 at update 7" in report  # dts_hard_update 0.6 of 12 updates
    row = next(line for line in report.splitlines() if line.startswith("| evomoe | 1 | "))
    rerouted = float(row.rstrip(" |").rsplit("|", 1)[1])
    assert 0 < rerouted <= 100  # the paper's threshold rule still routes to several experts at the switch
    compute = [c for c in evo["train_curve"]["moe_expert_compute"] if c is not None]
    assert compute and compute == sorted(compute) and compute[-1] > sw["train_curve"]["moe_expert_compute"][-1]
    # a second call finds the finished runs and does not train again
    again = sh("compare_gates.py", "--tasks", "lm", "--gates", "switch,evomoe", "--seeds", "1", "--updates", 12,
               "--train-lines", 300, "--eval-lines", 40, "--spm-vocab", 500, "--max-tokens", 512,
               "--validations", 3, "--max-valid-steps", 2, "--work-dir", work, "--results", work / "results2.md")
    assert again.stdout.count("done earlier") == 2
    sharing = f"2 run(s) at a time, {max(1, (os.cpu_count() or 1) // 2)} thread(s) each"  # --jobs 2
    assert sharing in report
    assert sharing in (work / "results2.md").read_text()  # as the runs recorded it, not as the second call runs


@pytest.mark.slow  # the comparison fixture trains with fairseq-train
def test_plot_routing_on_real_log(comparison, tmp_path):
    work, _ = comparison
    log = work / "lm" / "evomoe" / "seed1" / "train.log"
    sys.path.insert(0, str(SCRIPTS))
    from plot_routing import parse_log, series

    parsed = parse_log(log)
    _, phases = series(parsed["train"], "moe_phase")
    _, temps = series(parsed["train"], "moe_temperature")
    assert phases[0] < 0.5 and phases[-1] > 1.5  # diversify at the start, top-1 at the end
    assert temps[-1] < temps[1]  # the temperature falls
    assert parsed["valid"] and "inner_loss" in parsed["valid"][-1]

    proc = sh("plot_routing.py", "--run", f"EvoMoE={log}", "--run", f"Switch={work / 'lm' / 'switch' / 'seed1' / 'train.log'}",
              "--out-dir", tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["expert_load_EvoMoE.png", "expert_load_Switch.png", "routing.png", "validation.png"], proc.stdout
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    bad = sh("plot_routing.py", "--run", f"x={tmp_path / 'nope.log'}", "--out-dir", tmp_path, check=False)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    twice = sh("plot_routing.py", f"x={log}", "--run", f"x={log}", "--out-dir", tmp_path, check=False)
    assert twice.returncode != 0 and "a run is already named 'x'" in twice.stderr


# ------------------------------------------------------------------ reruns, settings, paths (fast; stubbed tools)

def _import_script(name):
    for folder in (SCRIPTS, BENCHMARKS):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import importlib

    return importlib.import_module(name)


def _fake_compare_tools(monkeypatch):
    """compare_gates without fairseq: data preparation writes the marker file, training writes a log
    with validations and a checkpoint, evaluation and plots are skipped (replaced in the compare
    package's modules, where the script's parts look them up). Returns the training calls."""
    calls = []

    def fake_run(cmd, out_file, env):
        Path(out_file).write_text("$ " + " ".join(cmd) + "\n")
        if cmd[0] == "bash":  # prepare_*.sh
            dest = Path(cmd[cmd.index("--out-dir") + 1])
            (dest / "bin").mkdir(parents=True, exist_ok=True)
            (dest / "bin" / "train.bin").write_text(" ".join(cmd))
            calls.append(("prepare", cmd))
            return
        n = int(cmd[cmd.index("--max-update") + 1])
        Path(cmd[cmd.index("--log-file") + 1]).write_text(
            json.dumps({"valid_loss": "5.0", "valid_inner_loss": "5.0", "valid_num_updates": str(n)}) + "\n")
        ckpt = Path(cmd[cmd.index("--save-dir") + 1])
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "checkpoint_last.pt").write_text(f"trained {n} updates")
        calls.append(("train", cmd))

    monkeypatch.setattr(_import_script("compare.commands"), "run_command", fake_run)
    monkeypatch.setattr(_import_script("compare.evaluation"), "evaluate", lambda a, task, gate, data, run_dir, env: {"ppl": 10.0})
    monkeypatch.setattr(_import_script("compare.report"), "make_plots", lambda runs, out: [])
    return calls


def test_compare_gates_reuses_a_result_only_with_the_same_settings(tmp_path, monkeypatch, capsys):
    """A smoke run (--updates 20) and then a default run in the same work dir: the second must train
    200 updates (not report the 20-update result as 200), keep the earlier run, and say why; data
    prepared with another vocabulary or unknown settings is never reused."""
    cg = _import_script("compare_gates")
    calls = _fake_compare_tools(monkeypatch)
    work = tmp_path / "work"
    legacy = work / "data" / "wikitext-2_spm4000"  # made by someone else / an older version: no settings.json
    (legacy / "bin").mkdir(parents=True)
    (legacy / "bin" / "train.bin").write_text("legacy")
    common = ["--tasks", "lm", "--gates", "switch", "--seeds", "1", "--work-dir", str(work),
              "--results", str(tmp_path / "results.md"), "--data-dir", str(shared_data_dir())]
    run_dir = work / "lm" / "switch" / "seed1"

    assert cg.main(common + ["--updates", "20"]) == 0
    out = capsys.readouterr().out
    assert "unknown settings" in out and (legacy / "bin" / "train.bin").read_text() == "legacy"  # left alone
    data_dir = work / "data" / "wikitext-2_spm4000-2"
    assert json.loads((data_dir / "settings.json").read_text())["complete"] is True
    assert json.loads((run_dir / "result.json").read_text())["updates"] == 20

    assert cg.main(common) == 0  # default: 200 updates
    out = capsys.readouterr().out
    res = json.loads((run_dir / "result.json").read_text())
    assert res["updates"] == 200 and res["settings"]["updates"] == 200 and res["valid_updates"] == [200]
    assert "settings changed: updates 20 -> 200" in out and "done earlier" not in out
    prev = list((work / "lm" / "switch").glob("seed1.previous-*"))
    assert len(prev) == 1 and json.loads((prev[0] / "result.json").read_text())["updates"] == 20
    assert (prev[0] / "ckpt" / "checkpoint_last.pt").read_text() == "trained 20 updates"  # nothing lost
    assert [c[0] for c in calls] == ["prepare", "train", "train"]  # data reused: same settings

    assert cg.main(common) == 0  # same settings again: reused
    assert "done earlier" in capsys.readouterr().out and len(calls) == 3

    assert cg.main(common + ["--spm-vocab", "500"]) == 0  # another vocabulary: other data, retrained
    out = capsys.readouterr().out
    assert [c[0] for c in calls[3:]] == ["prepare", "train"]
    assert calls[3][1][calls[3][1].index("--out-dir") + 1] == str(work / "data" / "wikitext-2_spm500")
    assert str(work / "data" / "wikitext-2_spm500" / "bin") == calls[4][1][1]
    assert "data.spm_vocab 4000 -> 500" in out
    assert len(list((work / "lm" / "switch").glob("seed1.previous-*"))) == 2

    # an unfinished run with the same settings but no interval checkpoint to resume from: trained again,
    # and what it saved is moved aside, not deleted
    (run_dir / "result.json").unlink()
    assert cg.main(common + ["--spm-vocab", "500"]) == 0
    assert "an unfinished run with the same settings was moved to" in capsys.readouterr().out
    saved = [p / "ckpt" / "checkpoint_last.pt" for p in (work / "lm" / "switch").glob("seed1.previous-*")]
    assert len(saved) == 3 and all(p.exists() for p in saved)


@pytest.mark.slow  # trains with fairseq-train
def test_an_interrupted_comparison_run_resumes_to_the_uninterrupted_result(comparison, tmp_path, monkeypatch, capsys):
    """A run killed after its first checkpoint, then resumed by calling the comparison again, ends
    with the validation and training curves of a run never interrupted that saved only at its last
    update (the checkpoint cadence changes nothing, so results made before runs saved mid-way are
    reused). EvoMoE through every phase: the Gumbel noise and the schedules must resume exactly."""
    cg = _import_script("compare_gates")
    commands, flags = _import_script("compare.commands"), _import_script("compare.flags")
    monkeypatch.setattr(_import_script("compare.evaluation"), "evaluate", lambda a, task, gate, data, run_dir, env: {"ppl": 10.0})
    monkeypatch.setattr(_import_script("compare.report"), "make_plots", lambda runs, out: [])
    for k, v in script_env(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(k, v)
    real_run = commands.run_command
    interrupt = []

    def run(cmd, out_file, env):
        if not cmd[0].endswith("fairseq-train"):
            return real_run(cmd, out_file, env)
        cmd = [tool_path("fairseq-train")] + cmd[1:]
        if not interrupt:
            return real_run(cmd, out_file, env)
        ckpt = Path(cmd[cmd.index("--save-dir") + 1])
        with open(out_file, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
            while proc.poll() is None and not list(ckpt.glob("checkpoint_1_*.pt")):
                time.sleep(0.01)
            proc.kill()
            proc.wait()
        interrupt.clear()
        raise RuntimeError("killed after its first checkpoint")

    monkeypatch.setattr(commands, "run_command", run)
    common = ["--tasks", "lm", "--gates", "evomoe", "--seeds", "1", "--updates", "12", "--validations", "3",
              "--train-lines", "300", "--eval-lines", "40", "--spm-vocab", "500", "--max-tokens", "512",
              "--max-valid-steps", "2", "--data-dir", str(shared_data_dir())]
    once, twice = tmp_path / "once", tmp_path / "twice"
    for work in (once, twice):  # the data the comparison fixture prepared with these settings
        shutil.copytree(comparison[0] / "data", work / "data")

    with monkeypatch.context() as m:  # the old cadence: one checkpoint, at the last update
        m.setattr(flags, "checkpoint_interval", lambda a: a.updates)
        assert cg.main(common + ["--work-dir", str(once), "--results", str(tmp_path / "once.md")]) == 0
    ref = json.loads((once / "lm" / "evomoe" / "seed1" / "result.json").read_text())
    cmd = ref["settings"]["train_command"]
    assert cmd[cmd.index("--save-interval-updates") + 1] == "12"

    interrupt.append(True)
    assert cg.main(common + ["--work-dir", str(twice), "--results", str(tmp_path / "twice.md")]) == 1
    run_dir = twice / "lm" / "evomoe" / "seed1"
    newest = max(int(p.stem.rsplit("_", 1)[1]) for p in (run_dir / "ckpt").glob("checkpoint_1_*.pt"))
    assert not (run_dir / "result.json").exists() and newest in (4, 8)  # (8: killed late, on a busy machine)
    capsys.readouterr()
    assert cg.main(common + ["--work-dir", str(twice), "--results", str(tmp_path / "twice.md")]) == 0
    assert f"resuming the unfinished run from its checkpoint at update {newest}" in capsys.readouterr().out
    res = json.loads((run_dir / "result.json").read_text())
    assert res["resumed_from_update"] == newest and ref["resumed_from_update"] is None
    assert res["commit"].split()[0] == subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                      capture_output=True, text=True).stdout.strip()
    assert res["valid_updates"] == ref["valid_updates"] == [4, 8, 12]
    assert res["valid_loss"] == ref["valid_loss"]  # to the last logged digit
    assert res["train_curve"] == ref["train_curve"]
    assert len(list(run_dir.glob("train.out.previous-*"))) == 1  # the interrupted attempt's output is kept
    # the old-cadence result counts as done for the new cadence
    assert cg.main(common + ["--work-dir", str(once), "--results", str(tmp_path / "once.md")]) == 0
    assert "done earlier with the same settings" in capsys.readouterr().out


def test_compare_gates_report_only_reads_the_finished_runs(tmp_path, monkeypatch, capsys):
    """--report-only while a comparison is still running: the report holds the runs finished with
    these settings and names the others; nothing is trained, and an unfinished run is left in place
    (the comparison still running it may be writing there)."""
    cg = _import_script("compare_gates")
    calls = _fake_compare_tools(monkeypatch)
    work, report = tmp_path / "work", tmp_path / "results.md"
    common = ["--tasks", "lm", "--gates", "switch,hash", "--seeds", "1", "--updates", "20", "--work-dir", str(work),
              "--results", str(report), "--data-dir", str(shared_data_dir())]
    assert cg.main(common) == 0 and len(calls) == 3  # prepare, train switch, train hash
    unfinished = work / "lm" / "hash" / "seed1"
    (unfinished / "result.json").unlink()  # as while it trains
    capsys.readouterr()

    assert cg.main(common + ["--report-only"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 3 and (unfinished / "ckpt" / "checkpoint_last.pt").exists()
    assert not list((work / "lm" / "hash").glob("seed1.previous-*"))
    text = report.read_text()
    assert "| switch |" in text and "| hash |" not in text
    assert "1 of the comparison's runs have not finished yet" in text and "lm hash seed 1" in text
    assert "1 of 2 runs finished; not yet: lm hash seed 1" in out
    assert "--report-only" not in text  # the report's command is the comparison's, which trains the rest

    assert cg.main(common + ["--updates", "30", "--report-only"]) == 0  # results of other settings are not used
    assert "0 of 2 runs finished" in capsys.readouterr().out and len(calls) == 3


def test_compare_gates_paths_are_absolute(tmp_path, monkeypatch, capsys):
    """--data-dir / --work-dir / --results relative to the caller's folder, although the tools run in
    the repository root; a --data-dir that is not a folder is an error naming the option."""
    cg = _import_script("compare_gates")
    calls = _fake_compare_tools(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").symlink_to(shared_data_dir())
    a = cg.parse_args(["--tasks", "lm", "--data-dir", "mydata", "--work-dir", "w", "--results", "r.md"])
    assert Path(a.data_dir).is_absolute() and Path(a.data_dir) == (tmp_path / "mydata").resolve()
    assert Path(a.work_dir) == tmp_path / "w" and Path(a.results) == tmp_path / "r.md"
    cg.prepare_data(a, dict(os.environ))
    cmd = calls[0][1]
    assert Path(cmd[cmd.index("--data-dir") + 1]).is_absolute()
    with pytest.raises(SystemExit):
        cg.parse_args(["--data-dir", "no-such-folder"])
    assert "--data-dir no-such-folder is not a folder" in capsys.readouterr().err


def test_compare_gates_writes_no_report_into_docs_unless_asked(tmp_path, monkeypatch, capsys):
    """The report defaults to <work dir>/report.md (plots next to it), so a comparison started in the
    repository root leaves the hand-written docs/results.md alone; --results still writes anywhere."""
    cg = _import_script("compare_gates")
    _fake_compare_tools(monkeypatch)
    monkeypatch.chdir(REPO)
    a = cg.parse_args(["--tasks", "lm"])
    assert Path(a.results) == REPO / "runs" / "compare_gates" / "report.md"
    assert REPO / "docs" not in Path(a.results).parents
    work = tmp_path / "work"
    assert Path(cg.parse_args(["--work-dir", str(work)]).results) == work / "report.md"
    assert Path(cg.parse_args(["--results", str(tmp_path / "docs" / "r.md")]).results) == tmp_path / "docs" / "r.md"

    assert cg.main(["--tasks", "lm", "--gates", "switch", "--seeds", "1", "--updates", "20", "--work-dir", str(work),
                    "--data-dir", str(shared_data_dir())]) == 0
    assert "| switch |" in (work / "report.md").read_text()
    capsys.readouterr()


def _quickstart_stubs(tmp_path):
    """A PYTHON whose folder holds stub fairseq tools: preprocessing writes the binary marker files,
    training writes a checkpoint and a log, then fails (the rest of the quickstart is not needed)."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    scripts = {
        "python3": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
        "fairseq-preprocess": '#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --destdir ] && d="$2"; shift; done\n'
                              'mkdir -p "$d"; : > "$d/train.bin"; echo "a 1" > "$d/dict.txt"\n',
        "fairseq-train": '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in --save-dir) s="$2";; --log-file) l="$2";; esac; shift; done\n'
                         'mkdir -p "$s"; echo "stub run $STUB_RUN" > "$s/checkpoint_last.pt"; echo "{}" > "$l"\n'
                         'echo "stub fairseq-train" >&2; exit 1\n',
    }
    for name, text in scripts.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    return fake / "python3"


def test_quickstart_keeps_earlier_checkpoints_and_matches_data_settings(tmp_path):
    py = _quickstart_stubs(tmp_path)
    out = tmp_path / "my run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_best.pt").write_text("mine")

    def quickstart(run, train_lines):
        env = dict(os.environ, PYTHON=str(py), STUB_RUN=str(run), PYTHONWARNINGS="ignore")
        return subprocess.run(["bash", str(SCRIPTS / "quickstart.sh"), "--out-dir", str(out), "--updates", "20",
                               "--train-lines", str(train_lines), "--eval-lines", "10", "--data-dir", str(shared_data_dir())],
                              capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))

    first = quickstart(1, 100)
    assert "stub fairseq-train" in first.stdout + first.stderr, first.stderr  # it got to training
    prev = sorted(out.glob("checkpoints.previous-*"))
    assert len(prev) == 1 and (prev[0] / "checkpoint_best.pt").read_text() == "mine"
    assert f"moved to {prev[0]}" in first.stderr
    assert "train_lines=100" in (out / "data" / "settings.txt").read_text()

    second = quickstart(2, 100)  # again, no questions asked: the first run's checkpoint is moved aside too
    assert "already prepared with these settings" in second.stderr, second.stderr
    prev = sorted(out.glob("checkpoints.previous-*"))
    assert len(prev) == 2 and (prev[0] / "checkpoint_best.pt").read_text() == "mine"
    assert (prev[1] / "checkpoint_last.pt").read_text().strip() == "stub run 1" and (prev[1] / "train.log").is_file()
    assert (out / "checkpoints" / "checkpoint_last.pt").read_text().strip() == "stub run 2"

    third = quickstart(3, 50)  # other --train-lines: prepared again, the old data kept
    assert "prepared with other settings" in third.stderr, third.stderr
    old_data = list(out.glob("data.previous-*"))
    assert len(old_data) == 1 and lines(old_data[0] / "raw" / "train.txt") == 100
    assert lines(out / "data" / "raw" / "train.txt") == 50
    assert "train_lines=50" in (out / "data" / "settings.txt").read_text()


def test_plot_routing_paths_with_equals_signs(tmp_path, monkeypatch):
    pr = _import_script("plot_routing")
    seen = []
    monkeypatch.setattr(pr, "make_plots", lambda runs, out: seen.append(list(runs)) or [])
    log = tmp_path / "lr=0.002" / "train.log"
    log.parent.mkdir()
    log.write_text(json.dumps({"num_updates": "10", "loss": "5.0", "moe_experts_per_token": "1.0"}) + "\n")
    monkeypatch.chdir(tmp_path)
    out = ["--out-dir", str(tmp_path / "plots")]
    pr.main(["--run", f"A={log}"] + out)                      # NAME=PATH: split at the first '='
    pr.main(["--run", "B=lr=0.002/train.log"] + out)
    pr.main([str(log)] + out)                                  # positional existing files are plain paths
    pr.main(["lr=0.002/train.log"] + out)
    pr.main(["--run", "lr=0.002/train.log"] + out)             # no NAME=PATH file: the whole value is the path
    pr.main([f"C={log}"] + out)
    assert seen == [["A"], ["B"], ["lr=0.002"], ["lr=0.002"], ["lr=0.002"], ["C"]]


PROGRESS_LOG = """\
2026-11-23 07:00:01 | INFO | train_inner | {"epoch": 1, "update": 0.4, "loss": "9.512", "inner_loss": "9.5", "num_updates": "10", "lr": "0.001"}
2026-11-23 07:00:02 | INFO | valid | {"epoch": 1, "valid_loss": "9.3", "valid_inner_loss": "9.3", "valid_num_updates": "20"}
2026-11-23 07:00:03 | INFO | train_inner | {"epoch": 1, "update": 0.8, "loss": "9.101", "inner_loss": "9.1", "num_updates": "20", "lr": "0.002"}
2026-11-23 07:00:04 | INFO | valid | {"epoch": 1, "valid_loss": "9.0", "valid_inner_loss": "9.0", "valid_num_updates": "25"}
2026-11-23 07:00:04 | INFO | fairseq.checkpoint_utils | Saved checkpoint runs/quickstart/checkpoints/checkpoint_1_25.pt (epoch 1 @ 25 updates, score 9.0) (writing took 0.1 seconds)
2026-11-23 07:00:04 | INFO | fairseq_cli.train | end of epoch 1 (average epoch stats below)
2026-11-23 07:00:04 | INFO | train | {"epoch": 1, "train_loss": "9.2", "train_num_updates": "25", "train_lr": "0.0025"}
2026-11-23 07:00:04 | INFO | fairseq_cli.train | done training in 12.3 seconds
"""


def test_train_progress_counts_the_last_updates_and_done_training():
    """--max-update 25 with --log-interval 10: the last train_inner line says 20, the validation and
    epoch summary 25, and fairseq says "done training": finished, not stopped."""
    def progress(text):
        return subprocess.run([sys.executable, str(SCRIPTS / "train_progress.py"), "--total", "25"], input=text,
                              capture_output=True, text=True, timeout=60)

    done = progress(PROGRESS_LOG)
    assert done.returncode == 0 and "stopped" not in done.stderr and "25/25" in done.stderr, done.stderr
    assert "done training" in done.stderr
    # the epoch summary alone also counts
    summary_only = "".join(l for l in PROGRESS_LOG.splitlines(keepends=True) if "valid_loss" not in l and "done" not in l)
    assert "stopped" not in progress(summary_only).stderr
    # a run that really stopped early still says so, with the last output
    cut = progress("".join(PROGRESS_LOG.splitlines(keepends=True)[:3]))
    assert "training stopped at update 20 of 25" in cut.stderr
