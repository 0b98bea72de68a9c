"""The baseline gates through the real fairseq CLI on shipped data: fairseq-train + fairseq-generate
for BASE, Hash, StableMoE and dense MoE (Multi30k translation), the Hash gate in a GPT language
model (token ids reaching a decoder-only stack), and StableMoE resumed across its stage switch."""

import json

import pytest
import torch

from conftest import USER_DIR, run_cli

COMMON = ["--user-dir", USER_DIR, "--cpu", "--seed", "1", "--log-format", "json", "--log-interval", "1",
          "--no-epoch-checkpoints", "--optimizer", "adam", "--lr", "2e-3", "--num-workers", "0",
          "--disable-validation"]
MT = ["--task", "translation", "--arch", "transformer_moe_tiny", "--criterion", "moe_label_smoothed_cross_entropy",
      "--label-smoothing", "0.1", "--max-tokens", "2000"]

GATES = {
    "base": [],
    "hash": ["--hash-mode", "balanced"],
    "stablemoe": ["--moe-capacity-factor", "2", "--stablemoe-stage2-update", "10"],
    "dense_moe": [],
}


def train_rows(proc):
    """The `train_inner` metric dicts of a `--log-format json` run."""
    rows = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        if "| train_inner |" in line and "{" in line:
            rows.append({k: float(v) if k != "wall" else v for k, v in json.loads(line[line.index("{"):]).items()})
    return rows


def assert_learns(rows):
    vals = [r["inner_loss"] for r in rows]
    assert len(vals) >= 8, vals
    head, tail = sum(vals[:3]) / 3, sum(vals[-3:]) / 3
    assert tail < head - 0.3, f"loss did not go down: {vals}"


def gate_state(ckpt, name):
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    return {k: v for k, v in state.items() if k.endswith(name)}


@pytest.mark.parametrize("gate", sorted(GATES))
def test_translation_train_and_generate(gate, mt_data, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_cli("fairseq-train", mt_data, *COMMON, *MT, "--moe-gate", gate, *GATES[gate],
                   "--max-update", "16", "--save-dir", save)
    rows = train_rows(proc)
    assert_learns(rows)
    last = rows[-1]
    if gate == "dense_moe":
        assert last["moe_experts_per_token"] == 4.0 and last["moe_dropped_pct"] == 0.0
    else:
        assert last["moe_experts_per_token"] == 1.0
    if gate == "stablemoe":
        assert rows[0]["moe_phase"] == 1.0 and last["moe_phase"] == 2.0
    if gate == "base":  # balanced by construction: no expert is more than one token above the mean
        assert all(r["moe_busiest_load"] < 1.05 for r in rows)
    if gate == "hash":
        tables = gate_state(save / "checkpoint_last.pt", "gate.table")
        assert tables and all(t.dtype == torch.long for t in tables.values())

    gen = run_cli("fairseq-generate", mt_data, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
                  "--beam", "2", "--max-tokens", "2000", "--cpu", "--gen-subset", "test", "--max-len-b", "20")
    out = gen.stdout + gen.stderr
    assert "BLEU4" in out
    assert sum(1 for line in gen.stdout.splitlines() if line.startswith("H-")) >= 90


def test_hash_gate_in_gpt_language_model(lm_data, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_cli("fairseq-train", lm_data, *COMMON, "--task", "language_modeling", "--arch", "transformer_lm_moe_tiny",
                   "--moe-gate", "hash", "--hash-mode", "balanced", "--criterion", "moe_cross_entropy",
                   "--tokens-per-sample", "64", "--max-tokens", "2000", "--max-update", "16", "--save-dir", save)
    rows = train_rows(proc)
    assert_learns(rows)
    assert rows[-1]["moe_experts_per_token"] == 1.0 and rows[-1]["moe_gate_loss"] == 0.0
    ev = run_cli("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
                 "--cpu", "--tokens-per-sample", "64", "--max-tokens", "2048", "--gen-subset", "valid")
    assert "Perplexity" in ev.stdout + ev.stderr


def test_stablemoe_resumes_in_stage2(mt_data, tmp_path):
    save = tmp_path / "ckpt"
    args = [mt_data, *COMMON, *MT, "--moe-gate", "stablemoe", "--moe-capacity-factor", "2",
            "--stablemoe-stage2-update", "6", "--save-interval-updates", "4", "--save-dir", save]
    first = run_cli("fairseq-train", *args, "--max-update", "10")
    phases = [r["moe_phase"] for r in train_rows(first)]
    assert phases[:6] == [1.0] * 6 and set(phases[6:]) == {2.0}, phases
    before = gate_state(save / "checkpoint_last.pt", "gate.frozen_table")
    assert before and all(v.item() for v in gate_state(save / "checkpoint_last.pt", "gate.frozen").values())

    resumed = run_cli("fairseq-train", *args, "--max-update", "14", "--restore-file", save / "checkpoint_last.pt")
    text = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in text and "@ 10 updates" in text
    rows = train_rows(resumed)
    assert [r["num_updates"] for r in rows] == [11.0, 12.0, 13.0, 14.0]
    assert all(r["moe_phase"] == 2.0 for r in rows)
    after = gate_state(save / "checkpoint_last.pt", "gate.frozen_table")
    assert before.keys() == after.keys()
    for k in before:  # the frozen routing carried over, not recomputed from the moved distilled router
        assert torch.equal(before[k], after[k])
