"""The reproduction kit's scripts on the shipped corpora (small slices, no download): data
preparation, argument errors, translation evaluation, the gate comparison at a minimal setting,
and the routing plots on the real training log that comparison writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, USER_DIR, run_cli, shared_data_dir

SCRIPTS = REPO / "scripts"


def sh(script, *args, check=True, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["bash", str(SCRIPTS / script), *map(str, args)] if script.endswith(".sh") else \
        [sys.executable, str(SCRIPTS / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def lines(p):
    with open(p, encoding="utf-8") as f:
        return sum(1 for _ in f)


# ---------------------------------------------------------------------------------------- data

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


def test_prepare_wikitext_word_level(tmp_path):
    out = tmp_path / "wt"
    sh("prepare_wikitext.sh", "--data-dir", shared_data_dir(), "--out-dir", out, "--train-lines", 400,
       "--valid-lines", 40, "--test-lines", 40)
    assert lines(out / "raw" / "train.txt") == 400
    for split in ("train", "valid", "test"):
        assert (out / "bin" / f"{split}.bin").is_file()
    words = {l.split()[0] for l in (out / "bin" / "dict.txt").read_text(encoding="utf-8").splitlines()}
    assert "the" in words and "@-@" in words  # word-level WikiText tokens, no subwords


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
                                    "evaluate_translation.sh", "evaluate_lm.sh", "quickstart.sh"])
def test_shell_scripts_reject_bad_options(script):
    proc = sh(script, "--no-such-option", check=False)
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


# ---------------------------------------------------------------------------------------- evaluation

def test_evaluate_translation_bleu(mt_data, tmp_path):
    """fairseq-generate (beam 5) + sacrebleu on a tiny Multi30k model (whitespace tokens: --post-process none)."""
    ckpt = tmp_path / "ckpt"
    run_cli("fairseq-train", mt_data, "--user-dir", USER_DIR, "--task", "translation", "-s", "de", "-t", "en",
            "--arch", "transformer_moe_tiny", "--share-all-embeddings", "--moe-expert-count", "2",
            "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--optimizer", "adam",
            "--lr", "0.003", "--max-tokens", "1024", "--max-update", "4", "--cpu", "--save-dir", ckpt,
            "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0")
    ref = shared_data_dir() / "multi30k" / "test_2016_flickr.en"
    proc = sh("evaluate_translation.sh", "--data-bin", mt_data, "--checkpoint", ckpt / "checkpoint_last.pt",
              "--task", "translation", "--post-process", "none", "--ref", ref, "--max-len-a", "1", "--max-len-b", "5", "--out-dir", tmp_path / "ev")
    res = json.loads((tmp_path / "ev" / "bleu.test.json").read_text())
    assert res["name"] == "BLEU" and 0 <= res["score"] <= 100
    assert lines(tmp_path / "ev" / "hyp.test.detok.txt") == 100
    assert "BLEU (test, sacrebleu, detokenised)" in proc.stdout
    assert "first 100 of 1000 reference lines" in proc.stderr


# ---------------------------------------------------------------------------------------- comparison + plots

@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    work = tmp_path_factory.mktemp("compare")
    proc = sh("compare_gates.py", "--tasks", "lm", "--gates", "switch,evomoe", "--seeds", "1", "--updates", 12,
              "--train-lines", 300, "--eval-lines", 40, "--spm-vocab", 500, "--max-tokens", 512,
              "--validations", 3, "--max-valid-steps", 2, "--work-dir", work, "--results", work / "results.md", "--jobs", 2,
              timeout=600)
    return work, proc


def test_compare_gates_minimal(comparison):
    work, proc = comparison
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
    # a second call finds the finished runs and does not train again
    again = sh("compare_gates.py", "--tasks", "lm", "--gates", "switch,evomoe", "--seeds", "1", "--updates", 12,
               "--train-lines", 300, "--eval-lines", 40, "--spm-vocab", 500, "--max-tokens", 512,
               "--validations", 3, "--max-valid-steps", 2, "--work-dir", work, "--results", work / "results2.md")
    assert again.stdout.count("done earlier") == 2
    assert f"2 run(s) at a time, {max(1, (os.cpu_count() or 1) // 2)} thread(s) each" in report  # --jobs 2


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


# ----------------------------------------------------------------------------------- benchmarks

def test_bench_moe_layer_prints_a_row_per_setting():
    """The layer benchmark at toy sizes: one table row per (E, tokens) with the ratio columns and one
    ratio per compared expert variant (the real sizes take minutes; the numbers are not checked)."""
    proc = sh("bench_moe_layer.py", "--dim", 16, "--ffn", 32, "--experts", 2, 4, "--tokens", 64,
              "--reps", 1, "--threads", 1, "--compare", "grouped_mm", "fresh_grads")
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert [r.split("|")[1:3] for r in rows] == [[" 2 ", " 64 "], [" 4 ", " 64 "]]
    for row in rows:
        assert "index / grouped_mm index" in row and "index / fresh_grads index" in row
    bad = sh("bench_moe_layer.py", "--compare", "bogus", check=False)
    assert bad.returncode == 2 and "--compare" in bad.stderr and "fresh_grads" in bad.stderr
