"""The baseline gates through the real fairseq CLI on shipped data: fairseq-train + fairseq-generate
for BASE, Hash, StableMoE and dense MoE (Multi30k translation), and StableMoE resumed across its
stage switch. (The Hash gate in a GPT language model, token ids reaching a decoder-only stack, is
checked in-process: test_moe_models.py.)"""

import json

import pytest
import torch

from conftest import USER_DIR, run_cli, translate_test_set

pytestmark = pytest.mark.slow  # every test trains with fairseq-train

COMMON = ["--user-dir", USER_DIR, "--cpu", "--seed", "1", "--log-format", "json", "--log-interval", "1",
          "--no-epoch-checkpoints", "--optimizer", "adam", "--lr", "2e-3", "--num-workers", "0",
          "--disable-validation"]
MT = ["--task", "translation", "--arch", "transformer_moe_tiny", "--criterion", "moe_label_smoothed_cross_entropy",
      "--label-smoothing", "0.1", "--max-tokens", "1200"]

GATES = {
    "base": [],
    "hash": ["--hash-mode", "balanced"],
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


def assert_generates(mt_data, ckpt):
    """fairseq-generate on a quarter of the test set, to keep it quick (fairseq-generate gives worker 0
    of 4 every fourth batch of 5 sentences; --num-shards shards data folders, not sentences),
    translates every sentence of it and prints BLEU."""
    translate_test_set(mt_data, ckpt, "--batch-size", "5", "--distributed-world-size", "4", "--distributed-rank", "0",
                       sentences=25)


def gate_state(ckpt, name):
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    return {k: v for k, v in state.items() if k.endswith(name)}


@pytest.mark.parametrize("gate", sorted(GATES))
def test_translation_train_and_generate(gate, mt_data, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_cli("fairseq-train", mt_data, *COMMON, *MT, "--moe-gate", gate, *GATES[gate],
                   "--max-update", "12", "--save-dir", save)
    rows = train_rows(proc)
    assert_learns(rows)
    last = rows[-1]
    if gate == "dense_moe":
        assert last["moe_experts_per_token"] == 4.0 and last["moe_dropped_pct"] == 0.0
    else:
        assert last["moe_experts_per_token"] == 1.0
    if gate == "base":  # balanced by construction: no expert is more than one token above the mean
        assert all(r["moe_busiest_load"] < 1.05 for r in rows)
    if gate == "hash":
        tables = gate_state(save / "checkpoint_last.pt", "gate.table")
        assert tables and all(t.dtype == torch.long for t in tables.values())

    assert_generates(mt_data, save / "checkpoint_last.pt")


def test_stablemoe_train_resume_across_stage2_and_generate(mt_data, tmp_path):
    """Stage 1 for 4 updates, stage 2 from then on (capacity factor 2, the paper's); the run is
    stopped at 6 and resumed from checkpoint_last.pt to 10, in stage 2 with the same frozen routing."""
    save = tmp_path / "ckpt"
    args = [mt_data, *COMMON, *MT, "--moe-gate", "stablemoe", "--moe-capacity-factor", "2",
            "--stablemoe-stage2-update", "4", "--save-interval-updates", "3", "--save-dir", save]
    first = run_cli("fairseq-train", *args, "--max-update", "6")
    first_rows = train_rows(first)
    phases = [r["moe_phase"] for r in first_rows]
    assert phases == [1.0] * 4 + [2.0] * 2, phases
    at3 = list(save.glob("checkpoint_*_3.pt"))  # the interval checkpoint from stage 1
    assert len(at3) == 1 and not any(v.item() for v in gate_state(at3[0], "gate.frozen").values())
    before = gate_state(save / "checkpoint_last.pt", "gate.frozen_table")
    assert before and all(v.item() for v in gate_state(save / "checkpoint_last.pt", "gate.frozen").values())

    resumed = run_cli("fairseq-train", *args, "--max-update", "10", "--restore-file", save / "checkpoint_last.pt")
    text = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in text and "@ 6 updates" in text
    rows = train_rows(resumed)
    assert [r["num_updates"] for r in rows] == [7.0, 8.0, 9.0, 10.0]
    assert_learns(first_rows + rows)
    assert all(r["moe_phase"] == 2.0 for r in rows)
    after = gate_state(save / "checkpoint_last.pt", "gate.frozen_table")
    assert before.keys() == after.keys()
    for k in before:  # the frozen routing carried over, not recomputed from the moved distilled router
        assert torch.equal(before[k], after[k])
    assert_generates(mt_data, save / "checkpoint_last.pt")
