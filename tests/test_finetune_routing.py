"""Fine-tuning keeps the routing a model was pre-trained with: fairseq's fine-tuning flags restart
the update counter at 0, and no MoE layer may go back to an earlier phase because of it (a spawned
layer stays spawned, a DTS gate that reached top-1 stays top-1, StableMoE stays in stage 2)."""

import pytest

from conftest import ROBERTA_EVOMOE, USER_DIR, json_logs, run_cli

pytestmark = pytest.mark.slow  # every test trains with fairseq-train

COMMON = ["--user-dir", USER_DIR, "--cpu", "--seed", "1", "--log-format", "json", "--log-interval", "1",
          "--no-epoch-checkpoints", "--optimizer", "adam", "--lr", "2e-3", "--num-workers", "0",
          "--disable-validation"]
FINETUNE = ["--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"]


def test_dts_evomoe_stays_top1_when_fine_tuning_restarts_the_counter(lm_data, roberta_evomoe_pretrained, tmp_path):
    """roberta_evomoe_tiny pre-trained through every phase (spawn at 4, soft, top-1 from 10; tau_min
    0.5), then trained on with the reset flags from its checkpoint: top-1 from the first update, at
    tau_min, no second spawn."""
    pre, pre_proc = roberta_evomoe_pretrained
    rows = json_logs(pre_proc)
    assert rows[-1]["moe_phase"] == 2 and rows[-1]["moe_experts_per_token"] == 1.0
    tuned = run_cli("fairseq-train", lm_data, *COMMON, *ROBERTA_EVOMOE, *FINETUNE, "--max-update", "5", "--save-dir", tmp_path / "tuned",
                    "--restore-file", pre / "checkpoint_last.pt")
    rows = json_logs(tuned)
    assert [int(r["num_updates"]) for r in rows] == [1, 2, 3, 4, 5]  # the counter restarted
    assert all(r["moe_phase"] == 2 and r["moe_experts_per_token"] == 1.0 for r in rows)
    assert all(r["moe_temperature"] == pytest.approx(0.5) for r in rows)
    assert "EvoMoE: spawned" not in tuned.stdout + tuned.stderr


def test_stablemoe_stays_in_stage2_when_fine_tuning_restarts_the_counter(lm_data, tmp_path):
    lm = [lm_data, *COMMON, "--task", "language_modeling", "--arch", "transformer_lm_moe_tiny", "--criterion",
          "moe_cross_entropy", "--tokens-per-sample", "64", "--max-tokens", "512", "--moe-gate", "stablemoe",
          "--stablemoe-stage2-update", "6", "--moe-capacity-factor", "2"]
    pre = tmp_path / "pre"
    rows = json_logs(run_cli("fairseq-train", *lm, "--max-update", "8", "--save-dir", pre))
    assert rows[0]["moe_phase"] == 1 and rows[-1]["moe_phase"] == 2
    rows = json_logs(run_cli("fairseq-train", *lm, *FINETUNE, "--max-update", "3", "--save-dir", tmp_path / "tuned",
                             "--restore-file", pre / "checkpoint_last.pt"))
    assert [r["moe_phase"] for r in rows] == [2, 2, 2]
    # asked for, the schedule runs again from the restarted counter
    rows = json_logs(run_cli("fairseq-train", *lm, *FINETUNE, "--max-update", "3", "--save-dir", tmp_path / "rerun",
                             "--restore-file", pre / "checkpoint_last.pt", "--moe-rerun-schedules"))
    assert [r["moe_phase"] for r in rows] == [1, 1, 1]
