"""The gate-comparison harness's settings across the change of the DTS gate's defaults: every DTS run
records its hard-phase routing and soft-phase balance-loss weight explicitly, and a run recorded
before that (without them) counts as made with the defaults of its time."""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # plot_routing
sys.path.insert(0, str(REPO / "benchmarks"))

from compare.flags import DTS_DEFAULTS, gate_options_for  # noqa: E402
from compare.run_store import same_settings  # noqa: E402

DIAGNOSIS_GATES = REPO / "benchmarks" / "diagnosis" / "gates"


def options(gate, gate_dir=None):
    a = argparse.Namespace(spawn_mode="mask", tau_schedule="linear", gate_dir=gate_dir)
    args = gate_options_for(a, gate, "lm")[1]
    return args, {f: args[args.index(f) + 1] for f in DTS_DEFAULTS if f in args}


def test_the_harness_knows_the_code_defaults():
    from fairseq_evomoe.criterions.moe_loss import MoELossOptions
    from fairseq_evomoe.evomoe.dts_gate import DTSOptions

    assert DTS_DEFAULTS == {"--dts-hard-routing": DTSOptions.dts_hard_routing,
                            "--moe-soft-gate-loss-wt": f"{MoELossOptions.moe_soft_gate_loss_wt:g}"}
    assert options("evomoe")[1] == {"--dts-hard-routing": "argmax", "--moe-soft-gate-loss-wt": "0"}
    assert options("switch")[1] == {}  # other gates: nothing added


def test_diagnosis_gates_keep_the_meaning_they_had_in_the_study():
    """benchmarks/diagnosis/gates/evomoe.yaml extends configs/gate/evomoe.yaml with the defaults the
    study ran; each variant is one change from it."""
    want = {"evomoe": ("sample", "-1"), "evomoe_argmax": ("argmax", "-1"), "evomoe_soft_bal0": ("sample", "0"),
            "evomoe_argmax_bal0": ("argmax", "0")}
    for gate, (routing, weight) in want.items():
        assert options(gate, DIAGNOSIS_GATES)[1] == {"--dts-hard-routing": routing, "--moe-soft-gate-loss-wt": weight}, gate
    # apart from those two, the study's evomoe is configs/gate/evomoe.yaml
    strip = lambda args: [x for i, x in enumerate(args) if x not in DTS_DEFAULTS and args[i - 1] not in DTS_DEFAULTS]
    assert strip(options("evomoe", DIAGNOSIS_GATES)[0]) == strip(options("evomoe")[0])


def test_a_run_recorded_before_the_explicit_options_is_reused_only_for_its_defaults():
    def settings(gate_options):
        return {"gate": "evomoe", "seed": 1, "gate_options": gate_options,
                "train_command": ["fairseq-train", "<data>/bin", "--seed", "1", "--save-interval-updates", "50"] + gate_options}

    study_evomoe = options("evomoe", DIAGNOSIS_GATES)[0]
    recorded_before = [x for i, x in enumerate(study_evomoe)
                       if x not in DTS_DEFAULTS and study_evomoe[i - 1] not in DTS_DEFAULTS]  # no explicit flags
    assert len(recorded_before) == len(study_evomoe) - 4
    assert same_settings(settings(recorded_before), settings(study_evomoe))  # sample, -1: what it ran
    assert not same_settings(settings(recorded_before), settings(options("evomoe")[0]))  # today's defaults differ
    reordered = recorded_before + ["--moe-soft-gate-loss-wt", "-1.0", "--dts-hard-routing", "sample"]
    assert same_settings(settings(reordered), settings(study_evomoe))  # where the flags stand, and -1 vs -1.0


def page_command(page: Path) -> list:
    """The harness's argv from a report's `Command:` line (without --note and --results)."""
    import re
    import shlex

    line = re.search(r"^Command: `python benchmarks/compare_gates.py (.*)`$", page.read_text(encoding="utf-8"), re.M)
    argv = shlex.split(line.group(1))
    for flag in ("--note", "--results"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    return argv


# each report with the run store its page points to (results_long*.md: the store moved to
# benchmarks/runs; docs/results.md gives the command that reuses it)
STORED_REPORTS = [
    ("docs/results_long.md", ["--work-dir", "benchmarks/runs", "--gate-dir", "benchmarks/diagnosis/gates"]),
    ("docs/results_long_mt.md", ["--work-dir", "benchmarks/runs", "--gate-dir", "benchmarks/diagnosis/gates"]),
    ("benchmarks/diagnosis/report_lm.md", []),
    ("benchmarks/diagnosis/report_lm_fresh.md", []),
    ("benchmarks/diagnosis/report_mt.md", []),
]


def test_every_stored_run_is_reused_by_its_reports_command():
    """Rerunning a report's command (as its page says) reuses every committed result instead of
    moving it aside and training again: a change to a gate's config or to the harness's flags that
    would silently retrain the stored runs fails here. The data directory is the one the runs
    recorded (a run made from other data is not the same run)."""
    from compare.cli import parse_args
    from compare.data_cache import locate_data
    from compare.run_store import finished_result, run_dir
    from compare.settings import read_json

    checked = 0
    for page, extra in STORED_REPORTS:
        argv = page_command(REPO / page) + extra
        a = parse_args([str(REPO / x) if x.startswith(("benchmarks/", "docs/")) else x for x in argv], "test")
        for task in a.tasks:
            for gate in a.gates:
                for seed in a.seeds:
                    result = run_dir(a, task, gate, seed) / "result.json"
                    if not result.is_file():
                        continue  # listed in the report as missing
                    a.data_dir = Path(read_json(result)["settings"]["data"]["data_dir"])
                    data = locate_data(a, task)[0]
                    assert finished_result(a, task, gate, seed, data) is not None, f"{page}: {task} {gate} seed {seed} would be trained again"
                    checked += 1
    assert checked >= 111, checked  # the stored results when this test was written


def test_a_variants_own_spawn_mode_and_schedule_are_kept_unless_asked_otherwise(tmp_path):
    """--spawn-mode / --tau-schedule replace a gate config's only where given: a --gate-dir variant that
    sets its own is trained with them, not with gate=evomoe's mask / linear."""
    (tmp_path / "evomoe_reinit.yaml").write_text("defaults:\n  - evomoe\n  - _self_\n\nevomoe_spawn_mode: reinit\ndts_tau_schedule: cosine\n")

    def chosen(**kw):
        a = argparse.Namespace(**{"spawn_mode": None, "tau_schedule": None, **kw}, gate_dir=tmp_path)
        args = gate_options_for(a, "evomoe_reinit", "lm")[1]
        return args[args.index("--evomoe-spawn-mode") + 1], args[args.index("--dts-tau-schedule") + 1]

    assert chosen() == ("reinit", "cosine")
    assert chosen(spawn_mode="copy", tau_schedule="linear") == ("copy", "linear")


def test_harness_options_are_checked(capsys):
    import pytest

    from compare.cli import parse_args

    for argv, message in [(["--seeds", "1,2,1"], "--seeds names 1 more than once"),
                          (["--gates", "switch,hash,switch"], "--gates names switch more than once"),
                          (["--spm-vocab", "0"], "--spm-vocab must be >= 1"),
                          (["--experts", "0"], "--experts must be >= 1"),
                          (["--lr", "nan"], "--lr must be a positive number"),
                          (["--train-lines", "100", "--eval-lines", "0"], "--eval-lines must be >= 1 with --train-lines")]:
        with pytest.raises(SystemExit):
            parse_args(argv, "test")
        assert message in capsys.readouterr().err, argv
