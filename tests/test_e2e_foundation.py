"""The foundation through the real fairseq CLI (`--user-dir fairseq_evomoe`) on shipped real data:
translation (Multi30k), GPT (WikiText-2) and RoBERTa MLM (WikiText-2); generation, eval-lm,
resume, checkpoint loading under torch's weights_only default, and start-up errors."""

import subprocess

import pytest

from conftest import REPO, USER_DIR, eval_lm_perplexity, json_logs, python_for_scripts, run_cli, translate_test_set

COMMON = ["--user-dir", USER_DIR, "--cpu", "--seed", "1", "--log-format", "json", "--log-interval", "1",
          "--no-epoch-checkpoints", "--optimizer", "adam", "--lr", "2e-3", "--num-workers", "0"]


def losses(proc, key="inner_loss"):
    return [r[key] for r in json_logs(proc)]


def assert_learns(proc):
    vals = losses(proc)
    assert len(vals) >= 8, vals
    head, tail = sum(vals[:3]) / 3, sum(vals[-3:]) / 3
    assert tail < head - 0.3, f"loss did not go down: {vals}"


@pytest.mark.slow
def test_translation_train_generate_and_resume(mt_data, tmp_path):
    save = tmp_path / "ckpt"
    args = [mt_data, *COMMON, "--task", "translation", "--arch", "transformer_moe_tiny", "--moe-gate", "top1",
            "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "1500",
            "--save-dir", save, "--disable-validation"]
    proc = run_cli("fairseq-train", *args, "--max-update", "16")
    assert_learns(proc)
    row = json_logs(proc)[-1]
    for key in ("moe_gate_loss", "moe_experts_per_token", "moe_dropped_pct", "moe_busiest_load", "moe_idlest_load",
                "moe_unused_experts", "moe_router_entropy"):
        assert key in row, f"{key} missing from the training log"
    assert row["moe_experts_per_token"] == 1.0

    translate_test_set(mt_data, save / "checkpoint_last.pt")

    # resume from the checkpoint and go on to 20 updates
    resumed = run_cli("fairseq-train", *args, "--max-update", "20", "--restore-file", save / "checkpoint_last.pt")
    text = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in text and "@ 16 updates" in text
    assert [r["num_updates"] for r in json_logs(resumed)][-1] == 20

    # a mistyped --restore-file is refused before training (fairseq would train from scratch)
    saved = sorted(p.name for p in save.iterdir())
    typo = run_cli("fairseq-train", *args, "--max-update", "24", "--restore-file", save / "checkpoint_lats.pt", check=False)
    text = typo.stdout + typo.stderr
    assert typo.returncode != 0
    assert f"--restore-file {save / 'checkpoint_lats.pt'}: no such file; fairseq would train from scratch" in text
    assert "train_inner" not in text and sorted(p.name for p in save.iterdir()) == saved


@pytest.mark.slow
def test_gpt_language_model_and_eval_lm(lm_data, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_cli("fairseq-train", lm_data, *COMMON, "--task", "language_modeling", "--arch", "transformer_lm_moe_tiny",
                   "--moe-gate", "top2", "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64",
                   "--max-tokens", "1024", "--max-update", "16", "--save-dir", save, "--disable-validation")
    assert_learns(proc)
    assert 1.0 < json_logs(proc)[-1]["moe_experts_per_token"] <= 2.0
    ev = run_cli("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
                 "--cpu", "--tokens-per-sample", "64", "--max-tokens", "2048", "--gen-subset", "valid")
    eval_lm_perplexity(ev, lm_data)


@pytest.mark.slow
def test_roberta_masked_lm(lm_data, tmp_path):
    proc = run_cli("fairseq-train", lm_data, *COMMON, "--task", "masked_lm", "--arch", "roberta_moe_tiny",
                   "--criterion", "moe_masked_lm", "--tokens-per-sample", "64", "--max-tokens", "1024",
                   "--max-update", "16", "--save-dir", tmp_path / "ckpt", "--disable-validation",
                   "--moe-capacity-factor", "0")
    assert_learns(proc)
    assert json_logs(proc)[-1]["moe_dropped_pct"] == 0.0


@pytest.mark.slow
def test_checkpoints_load_under_weights_only(tiny_mt_checkpoint):
    """A checkpoint written by fairseq-train loads with torch.load's safe default once the plugin is
    imported, and does not without it (the allowlist is what makes it work). --eval-bleu makes
    fairseq keep numpy arrays (BLEU n-gram counts) in the checkpoint's saved metrics."""
    ckpt = tiny_mt_checkpoint[0] / "checkpoint_last.pt"
    code = "import sys, torch; {imp}; s = torch.load(sys.argv[1]); print(sorted(s))"
    ok = subprocess.run([python_for_scripts(), "-c", code.format(imp="import fairseq_evomoe"), str(ckpt)],
                        capture_output=True, text=True, cwd=str(REPO))
    assert ok.returncode == 0, ok.stderr[-2000:]
    keys = ok.stdout.strip().splitlines()[-1]
    assert all(f"'{k}'" in keys for k in ("cfg", "model", "last_optimizer_state", "extra_state")), keys
    plain = subprocess.run([python_for_scripts(), "-c", code.format(imp="pass"), str(ckpt)], capture_output=True, text=True)
    assert plain.returncode != 0 and "weights_only" in plain.stderr


@pytest.mark.slow
def test_bad_options_fail_before_training(mt_data, tmp_path):
    """One bad option end to end: fairseq-train stops with the message before any update or checkpoint,
    and the architecture hands the validation its real layer counts. The messages themselves are
    checked in-process below (test_option_validation_messages, test_model_checks_against_the_task)."""
    message = "--moe-freq 3 is larger than the 2 layers of the encoder"
    proc = run_cli("fairseq-train", mt_data, *COMMON, "--task", "translation", "--arch", "transformer_moe_tiny",
                   "--criterion", "moe_label_smoothed_cross_entropy", "--max-tokens", "1500", "--max-update", "10",
                   "--save-dir", tmp_path / "ckpt", "--moe-freq", "3", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in text, text[-3000:]
    assert "train_inner" not in text and not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(moe_expert_count=0), "--moe-expert-count must be >= 1"),
        (dict(moe_capacity_factor=-1.0), "--moe-capacity-factor must be >= 0"),
        (dict(moe_eval_capacity_factor=-2.0), "--moe-eval-capacity-factor must be >= 0 (0 = dropless) or -1"),
        (dict(moe_drop_policy="random"), "--moe-drop-policy 'random' is not valid; choose one of: score, position"),
        (dict(moe_freq=-1), "--moe-freq must be >= 0"),
        (dict(moe_expert_ffn_dim=0), "--moe-expert-ffn-dim must be >= 1"),
        (dict(moe_router_jitter=1.5), "--moe-router-jitter must be in [0, 1)"),
        (dict(moe_expert_dtype="fp8"), "--moe-expert-dtype 'fp8' is not valid; choose one of: auto, bf16"),
        (dict(scale_fc=True), "--scale-fc"),
        (dict(moe_gate="nope"), "--moe-gate 'nope' is not a known gate; choose one of: base, dense_moe, dts,"),
        (dict(moe_freq=3), "--moe-freq 3 is larger than the 2 layers of the encoder"),
        (dict(moe_capacity_factor=float("nan")), "--moe-capacity-factor must be a finite number, got nan"),
        (dict(moe_eval_capacity_factor=float("inf")), "--moe-eval-capacity-factor must be a finite number, got inf"),
        (dict(moe_seed=2**64 + 1), "--moe-seed must be in [0, 2^63 - 1], got 18446744073709551617"),
        (dict(moe_seed=-1), "--moe-seed must be in [0, 2^63 - 1], got -1"),
    ],
)
def test_option_validation_messages(overrides, message):
    """The same validation the architectures run before building (the CLI case above goes end to end)."""
    from moe_helpers import moe_args

    from fairseq_evomoe.moe import options as moe_options

    with pytest.raises(ValueError) as err:
        moe_options.validate(moe_args(**overrides), {"encoder": 2, "decoder": 2})
    assert message in str(err.value)


def test_phases_past_max_update_are_warned(caplog):
    """A gate option that puts a routing phase at or after --max-update trains, with a warning."""
    from types import SimpleNamespace

    from moe_helpers import moe_args

    from fairseq_evomoe.models import model_checks

    task = SimpleNamespace(drives_evomoe_phases=True)
    cases = [
        (dict(moe_gate="dts", dts_anneal_updates=20, dts_hard_update=None),
         "--dts-anneal-updates (20, from the spawn at update 0) puts the end of the annealing, and the switch to top-1, at update 20"),
        (dict(moe_gate="dts", dts_anneal_updates=5, dts_hard_update=10), "--dts-hard-update puts the switch to top-1 at update 10"),
        (dict(moe_gate="stablemoe", stablemoe_stage2_update=10000), "--stablemoe-stage2-update puts StableMoE's stage 2 at update 10000"),
        (dict(moe_gate="dts", dts_anneal_updates=5, dts_hard_update=8), None),
        (dict(moe_gate="dts", dts_anneal_updates=20, dts_hard_update=8), None),  # top-1 from 8: the annealing's end no matter
        (dict(moe_gate="stablemoe", stablemoe_stage2_update=-1), None),
    ]
    for overrides, warning in cases:
        caplog.clear()
        with caplog.at_level("WARNING"):
            model_checks.check_model_against_task(moe_args(max_update=10, **overrides), task)
        found = [r.getMessage() for r in caplog.records if "not before --max-update 10: the run ends first" in r.getMessage()]
        assert found == ([f"{warning}, not before --max-update 10: the run ends first"] if warning else []), overrides

    # stage 2 from update 0 of a run from scratch would freeze an untrained router's table
    for stage2, warned in ((0, True), (5, False), (-1, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            model_checks.check_model_against_task(moe_args(max_update=10, moe_gate="stablemoe", stablemoe_stage2_update=stage2), task)
        assert any("--stablemoe-stage2-update 0 from scratch" in r.getMessage() for r in caplog.records) == warned


def test_model_checks_against_the_task():
    """The check the models run with the task before building: the spawn must come before --max-update."""
    from types import SimpleNamespace

    from moe_helpers import moe_args

    from fairseq_evomoe.models import model_checks

    task = SimpleNamespace(drives_evomoe_phases=True)
    model_checks.check_model_against_task(moe_args(evomoe_diversify_updates=9, max_update=10), task)
    with pytest.raises(ValueError) as err:
        model_checks.check_model_against_task(moe_args(evomoe_diversify_updates=10, max_update=10), task)
    assert "--evomoe-diversify-updates (10) must be below --max-update (10)" in str(err.value)
    for overrides, message in [(dict(evomoe_noise_scale=float("nan")), "--evomoe-noise-scale must be a finite number, got nan"),
                               (dict(evomoe_mask_ratio=1.5), "--evomoe-mask-ratio must be in [0, 1), got 1.5"),
                               (dict(evomoe_spawn_mode="clone"), "--evomoe-spawn-mode 'clone' is not valid; choose one of: mask, reinit")]:
        with pytest.raises(ValueError) as err:
            model_checks.check_model_against_task(moe_args(evomoe_diversify_updates=5, max_update=10, **overrides), task)
        assert message in str(err.value)
    with pytest.raises(ValueError, match="--evomoe-diversify-updates must be a finite number, got nan"):
        model_checks.check_model_against_task(moe_args(evomoe_diversify_updates=float("nan"), max_update=10), task)
    with pytest.raises(ValueError) as err:
        model_checks.check_model_against_task(moe_args(moe_gate="stablemoe", evomoe_diversify_updates=5, max_update=10,
                                                       stablemoe_stage2_update=5), task)
    assert "--stablemoe-stage2-update (5) is not after the expert spawn at update 5" in str(err.value)
    model_checks.check_model_against_task(moe_args(moe_gate="stablemoe", evomoe_diversify_updates=5, max_update=10,
                                                   stablemoe_stage2_update=6), task)
