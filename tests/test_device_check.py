"""benchmarks/device_check.sh on CPU: it refuses to run without a GPU, and the parts of it that read
logs and write the report (benchmarks/device_check/) judge real-format logs as the check would."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, python_for_scripts

sys.path.insert(0, str(REPO / "benchmarks" / "device_check"))

import checks  # noqa: E402
import logs  # noqa: E402
import report  # noqa: E402

SCRIPT = REPO / "benchmarks" / "device_check.sh"


def run_script(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO), env=dict(os.environ, **(env or {})))


def test_refuses_at_once_without_a_gpu(tmp_path):
    out = tmp_path / "report.md"
    proc = run_script("--out", out, env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, on a GPU machine too
    assert proc.returncode == 2
    assert "no CUDA GPU: torch.cuda.is_available() is False" in proc.stderr
    assert not out.exists() and not (tmp_path / "work").exists()  # nothing was run or written


def test_refuses_at_once_without_its_packages(tmp_path):
    """A Python without fairseq (a bare GPU machine, its GPU faked here): the check names what it
    cannot import."""
    bare = tmp_path / "bin" / "python3"
    bare.parent.mkdir()
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys, torch; sys.modules[\"fairseq\"] = None; "
                    "torch.cuda.is_available = lambda: True; "
                    f"exec(compile(sys.stdin.read(), \"-\", \"exec\"))' \"$@\"\n")
    bare.chmod(0o755)
    out = tmp_path / "report.md"
    proc = run_script("--out", out, env={"PYTHON": str(bare)})
    assert proc.returncode == 2, proc.stderr
    assert "cannot import: fairseq (" in proc.stderr and "nothing was run" in proc.stderr
    assert "torch (" not in proc.stderr  # what it has is not named
    assert not out.exists() and not (tmp_path / "work").exists()


def test_help_and_bad_options():
    proc = run_script("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage")
    assert "--budget SECONDS" in proc.stdout and "--only LIST" in proc.stdout
    assert "option --only takes section numbers 1-6" in run_script("--only", "7").stderr
    assert "option --budget must be a non-negative integer" in run_script("--budget", "soon").stderr
    assert "option --out needs a value" in run_script("--out").stderr
    bad = run_script("--no-such-option")
    assert bad.returncode == 2 and "unknown option '--no-such-option'" in bad.stderr


def fairseq_log(path, rows, extra=""):
    """A fairseq-train log as `--log-format json` prints it: one train_inner line per row."""
    lines = ["2026-12-06 21:15:40 | INFO | fairseq_cli.train | model transformer_lm_moe"]
    for r in rows:
        lines.append("2026-12-06 21:15:58 | INFO | train_inner | " + json.dumps({k: str(v) for k, v in r.items()}))
    lines.append('2026-12-06 21:16:00 | INFO | train | {"epoch": 1, "train_loss": "10.1", "train_moe_phase": "0.95"}')
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


def phase_rows(phases, loss=10.0):
    return [{"epoch": 1, "loss": loss - 0.1 * i, "moe_phase": p, "wps": 1000 + i, "num_updates": 2 * (i + 1)}
            for i, p in enumerate(phases)]


def test_every_phase_needs_phases_0_1_2_and_finite_losses(tmp_path):
    good = checks.every_phase([fairseq_log(tmp_path / "a.log", phase_rows([0, 0, 1, 1, 2]))])
    assert good.ok and "phases logged: [0, 1, 2]" in good.lines[0] and "first 10.000, last 9.600" in good.lines[1]
    # an interval that straddles a phase change averages to a fraction: not a phase
    no_hard = checks.every_phase([fairseq_log(tmp_path / "b.log", phase_rows([0, 1, 1.5]))])
    assert not no_hard.ok and "phases logged: [0, 1]" in no_hard.lines[0]
    rows = phase_rows([0, 1, 2])
    rows[1]["loss"] = "inf"
    overflow = "2026-12-06 | INFO | fairseq.trainer | NOTE: gradient overflow detected, ignoring gradient\n"
    inf = checks.every_phase([fairseq_log(tmp_path / "c.log", rows, extra=overflow)])
    assert not inf.ok and "all finite: False" in inf.lines[1] and inf.lines[2].endswith("(fp16 loss scaling): 1")


def test_expert_parallel_needs_the_second_worker(tmp_path):
    rows = phase_rows([0, 1, 2])
    alone = checks.expert_parallel([fairseq_log(tmp_path / "a.log", rows)])
    assert not alone.ok and "(rank 1)`): False" in alone.lines[0]
    both = checks.expert_parallel([fairseq_log(tmp_path / "b.log", rows, extra="INFO | distributed init (rank 1): env://\n")])
    assert both.ok


def test_words_per_second_leaves_out_the_first_interval(tmp_path):
    dense = [{"loss": 9.0, "wps": w, "num_updates": 25 * (i + 1)} for i, w in enumerate([50_000, 200_000, 220_000, 210_000])]
    moe = [{"loss": 9.0, "wps": w, "num_updates": 25 * (i + 1)} for i, w in enumerate([20_000, 100_000, 105_000, 110_000])]
    d, m = fairseq_log(tmp_path / "dense.log", dense), fairseq_log(tmp_path / "moe.log", moe)
    assert logs.median_wps(logs.train_records(d)) == 210_000
    one = checks.words_per_second([d])
    assert one.ok and "median 210,000 over 3 logged intervals" in one.lines[0]
    ratio = checks.wps_ratio([d, m])
    assert ratio.ok and "**0.50x** (105,000 / 210,000)" in ratio.lines[0]
    short = fairseq_log(tmp_path / "short.log", dense[:1])
    assert not checks.wps_ratio([d, short]).ok and not checks.words_per_second([short]).ok


PYTEST_SYNC_LOG = """\
..F                                                                      [100%]
=================================== FAILURES ===================================
============================== slowest durations ===============================
0.41s call     tests/test_sync_free.py::test_training_step_never_waits_for_the_gpu[top1-fp32]
0.01s setup    tests/test_sync_free.py::test_training_step_never_waits_for_the_gpu[top1-fp32]
0.05s call     tests/test_sync_free.py::test_training_step_never_waits_for_the_gpu[top2-all-bf16]
0.07s call     tests/test_sync_free.py::test_training_step_never_waits_for_the_gpu[stablemoe-stage2-fp32]
=========================== short test summary info ============================
PASSED tests/test_sync_free.py::test_training_step_never_waits_for_the_gpu[top1-fp32]
PASSED tests/test_sync_free.py::test_training_step_never_waits_for_the_gpu[top2-all-bf16]
FAILED tests/test_sync_free.py::test_training_step_never_waits_for_the_gpu[stablemoe-stage2-fp32] - RuntimeError: called a synchronizing CUDA operation
2 passed, 1 failed, 95 deselected in 3.10s
"""


def test_pytest_logs_are_read(tmp_path):
    assert logs.pytest_counts(PYTEST_SYNC_LOG) == {"passed": 2, "failed": 1, "deselected": 95}
    assert logs.pytest_counts("3 passed, 2 errors in 1.0s") == {"passed": 3, "error": 2}
    assert logs.params_of("t.py::f[top2-all-bf16]") == ["top2-all", "bf16"]
    assert logs.params_of("t.py::f[top1-fp32]") == ["top1", "fp32"]
    seconds = logs.pytest_call_seconds(PYTEST_SYNC_LOG)
    assert seconds["tests/test_sync_free.py::test_training_step_never_waits_for_the_gpu[top1-fp32]"] == 0.41
    (tmp_path / "sync.log").write_text(PYTEST_SYNC_LOG)
    table = checks.sync_table([str(tmp_path / "sync.log")])
    assert not table.ok and table.lines[0] == "- pytest: 2 passed, 1 failed, 95 deselected"
    assert table.lines[1].startswith("- 2 of 3 gate x dtype cases")
    assert "| case | fp32 | bf16 |" in table.lines
    assert "| top2-all | not run | no host sync (50 ms) |" in table.lines
    assert "| stablemoe-stage2 | FAILED (70 ms) | not run |" in table.lines
    run = checks.pytest_run([str(tmp_path / "sync.log")])
    assert not run.ok and run.lines[0] == "- pytest: 2 passed, 1 failed, 95 deselected"
    assert "stablemoe-stage2-fp32" in run.lines[1]
    (tmp_path / "ok.log").write_text("PASSED tests/a.py::t\n28 passed, 1 skipped in 40.2s\n")
    assert checks.pytest_run([str(tmp_path / "ok.log")]).ok


def test_the_layer_benchmark_table_is_read(tmp_path):
    """The real benchmarks/bench_moe_layer.py on a tiny CPU case, read as section 5 reads it."""
    log = tmp_path / "bench.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([python_for_scripts(), "benchmarks/bench_moe_layer.py", "--device", "cpu", "--dim", "16", "--ffn", "32",
                           "--experts", "2", "4", "--tokens", "64", "--reps", "1", "--warmup", "0", "--threads", "1"],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log.write_text(proc.stdout)
    rows = logs.bench_rows(proc.stdout)
    assert [(r["experts"], r["tokens"]) for r in rows] == [(2, 64), (4, 64)] and all(r["moe_over_dense"] > 0 for r in rows)
    outcome = checks.layer_bench([str(log)])
    assert outcome.ok and outcome.lines[-1].startswith("| 4 | 64 | ")


def test_report_is_written_section_by_section(tmp_path):
    out = tmp_path / "r" / "report.md"
    assert report.main(["header", "--out", str(out), "--argv", "--only 3"]) == 0
    text = out.read_text()
    assert text.startswith("# Device check") and "bash benchmarks/device_check.sh --only 3`" in text and "- machine: " in text
    good = fairseq_log(tmp_path / "good.log", phase_rows([0, 1, 2]))
    report.main(["start", "--out", str(out), "--title", "3a. bf16", "--command", "fairseq-train DATA --bf16", "--limit", "75"])
    assert "cut off while this section ran" in out.read_text()  # a run killed here still shows its command
    assert report.main(["finish", "--out", str(out), "--title", "3a. bf16", "--kind", "phases", "--log", good,
                        "--rc", "0", "--seconds", "12.34"]) == 0
    text = out.read_text()
    assert "## 3a. bf16" in text and "fairseq-train DATA --bf16" in text and "**PASS** in 12.3 s" in text
    assert "phases logged: [0, 1, 2]" in text
    # exit 0 but the log does not show the phases: a failure, with the log's tail in the report
    bad = fairseq_log(tmp_path / "bad.log", phase_rows([0, 0]))
    report.main(["start", "--out", str(out), "--title", "3b. fp16", "--command", "x", "--limit", "75"])
    assert report.main(["finish", "--out", str(out), "--title", "3b. fp16", "--kind", "phases", "--log", bad,
                        "--rc", "0", "--seconds", "3"]) == 1
    assert report.main(["finish", "--out", str(out), "--title", "4b. workers", "--kind", "expert_parallel",
                        "--log", good, "--rc", "124", "--seconds", "100"]) == 1
    report.main(["skip", "--out", str(out), "--title", "6a. dense", "--text", "5 s of the --budget of 470 s were left"])
    text = out.read_text()
    assert "**FAIL** in 3.0 s: exit 0, its log does not show what the section checks" in text
    assert "**FAIL** in 100.0 s: timed out (exit 124)" in text and "Last 4 lines of the log:" in text
    assert "**FAIL**: not run, 5 s of the --budget" in text
    assert report.main(["summary", "--out", str(out)]) == 1
    text = out.read_text()
    assert "| 3a. bf16 | PASS | 12.3 |" in text and "| total | | 115.3 |" in text
    assert "3 of 4 sections failed: 3b. fp16, 4b. workers, 6a. dense." in text


def test_report_names_a_missing_log(tmp_path):
    out = tmp_path / "report.md"
    report.main(["header", "--out", str(out)])
    assert report.main(["finish", "--out", str(out), "--title", "6. ratio", "--kind", "wps_ratio",
                        "--log", str(tmp_path / "nope.log"), "--seconds", "0"]) == 1
    assert f"no log file: `{tmp_path / 'nope.log'}`" in out.read_text()
    with pytest.raises(SystemExit):
        report.main(["finish", "--out", str(out), "--title", "x"])  # --kind and --log are required
    assert report.main(["summary", "--out", str(out)]) == 1
