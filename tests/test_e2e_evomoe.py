"""EvoMoE through the real fairseq CLI on shipped data: every phase in one `fairseq-train` command,
generation from the final checkpoint, and bit-exact resume across the phase boundaries."""

import shutil

import pytest
import torch

import fairseq_evomoe  # noqa: F401  (allowlists fairseq's checkpoint types for torch.load)
from conftest import USER_DIR, eval_lm_perplexity, json_logs, run_cli, trained_once, translate_test_set

pytestmark = pytest.mark.slow  # every test trains with fairseq-train

# T_div = 4, temperature 2.0 -> 0.1 over D = 8 updates, top-1 from H = 13.
# (tau_min 0.1 rather than the paper's 0.5, so that 4 experts visibly sparsify within a few updates.)
SCHEDULE = ["--evomoe-diversify-updates", "4", "--dts-anneal-updates", "8", "--dts-hard-update", "13",
            "--dts-tau-min", "0.1"]
COMMON = ["--user-dir", USER_DIR, "--cpu", "--seed", "1", "--log-format", "json", "--log-interval", "1",
          "--optimizer", "adam", "--lr", "2e-3", "--num-workers", "0", "--no-epoch-checkpoints"]


def lm_args(lm_data, save, *extra):
    return [lm_data, *COMMON, "--task", "evomoe_language_modeling", "--arch", "transformer_lm_evomoe_tiny",
            "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64", "--max-tokens", "512",
            "--save-dir", save, *SCHEDULE, *extra]


@pytest.fixture(scope="session")
def every_phase_lm(lm_data, tmp_path_factory):
    """(checkpoint folder, training output) of one LM run through every phase, 16 updates with a
    checkpoint at each; built once per test run for the phase, switch and resume tests."""
    return trained_once(tmp_path_factory, "evomoe_every_phase_lm", lambda save: lm_args(
        lm_data, save, "--max-update", "16", "--save-interval-updates", "1", "--disable-validation"))


def test_language_model_runs_every_phase(lm_data, every_phase_lm):
    save, proc = every_phase_lm
    rows = {int(r["num_updates"]): r for r in json_logs(proc)}
    text = proc.stdout + proc.stderr
    assert "EvoMoE: spawned 4 experts" in text and "at update 4" in text
    assert "EvoMoE phase at update 0: diversify" in text
    assert "EvoMoE phase at update 4: soft" in text and "EvoMoE phase at update 13: hard" in text

    # updates are logged after they finish: update n+1's row shows the routing of step n
    diversify = [rows[n] for n in range(1, 5)]
    soft = [rows[n] for n in range(5, 14)]
    hard = [rows[n] for n in range(14, 17)]
    assert all(r["moe_phase"] == 0 and r["moe_experts_per_token"] == 1 for r in diversify)
    assert all(r["moe_phase"] == 1 for r in soft) and all(r["moe_phase"] == 2 for r in hard)
    ept = [r["moe_experts_per_token"] for r in soft]
    assert ept[0] > 3.5, ept  # right after the spawn (tau = 2) nearly every expert is used
    assert ept[-1] < ept[0] - 0.5, ept  # and fewer as tau falls
    taus = [r["moe_temperature"] for r in soft]
    assert taus == sorted(taus, reverse=True) and taus[0] == pytest.approx(2.0) and taus[-1] == pytest.approx(0.1)
    assert all(r["moe_experts_per_token"] == 1.0 for r in hard)
    # the router's statistics (every update logs here: --log-interval 1)
    assert all(r["moe_router_logit_std"] > 0 and r["moe_router_top_gap"] > 0 for r in soft + hard)
    assert all(0 < r["moe_hard_eval_agree_pct"] <= 100 for r in hard)
    assert not any("moe_hard_eval_agree_pct" in r for r in diversify + soft)
    loss = [rows[n]["inner_loss"] for n in sorted(rows)]
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.5, loss

    ev = run_cli("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
                 "--cpu", "--tokens-per-sample", "64", "--max-tokens", "2048", "--gen-subset", "valid")
    eval_lm_perplexity(ev, lm_data)


def test_translation_runs_every_phase_and_generates(mt_data, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_cli("fairseq-train", mt_data, *COMMON, "--task", "evomoe_translation", "--arch", "transformer_evomoe_tiny",
                   "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                   "--max-tokens", "1000", "--max-update", "16", "--save-dir", save, *SCHEDULE)
    rows = json_logs(proc)
    assert rows[-1]["moe_phase"] == 2 and rows[-1]["moe_experts_per_token"] == 1.0
    assert max(r["moe_experts_per_token"] for r in rows) > 3.5
    valid = json_logs(proc, "valid")
    assert valid and valid[-1]["valid_moe_experts_per_token"] == 1.0  # evaluation is deterministic top-1
    translate_test_set(mt_data, save / "checkpoint_last.pt")


def test_dts_gate_without_the_phase_task(lm_data, tmp_path):
    """Plain language_modeling task: no diversify phase, the DTS schedule runs from update 0."""
    proc = run_cli("fairseq-train", lm_data, *COMMON, "--task", "language_modeling", "--arch", "transformer_lm_moe_tiny",
                   "--moe-gate", "dts", "--dts-anneal-updates", "6", "--dts-tau-min", "0.1", "--dts-hard-update", "8",
                   "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64", "--max-tokens", "512",
                   "--max-update", "10", "--save-dir", tmp_path / "ckpt", "--disable-validation")
    rows = json_logs(proc)
    assert rows[0]["moe_temperature"] == pytest.approx(2.0) and rows[0]["moe_experts_per_token"] > 3.5
    assert rows[-1]["moe_phase"] == 2 and rows[-1]["moe_experts_per_token"] == 1.0


def model_params(path):
    return torch.load(path, map_location="cpu")["model"]


def test_resume_is_exact_across_phases(lm_data, every_phase_lm, tmp_path):
    """Interrupted before the spawn, right after it, in the soft phase and after the hard switch, a
    resumed run ends with exactly the parameters of the uninterrupted run."""
    full, full_proc = every_phase_lm
    full_log = json_logs(full_proc)
    reference = model_params(full / "checkpoint_last.pt")
    assert bool(reference["decoder.layers.1.moe.spawned"])
    for stop in (3, 5, 9, 14):  # T_div = 4, H = 13
        resumed = tmp_path / f"from{stop}"
        resumed.mkdir()
        shutil.copy(full / f"checkpoint_1_{stop}.pt", resumed / "checkpoint_last.pt")
        proc = run_cli("fairseq-train", *lm_args(lm_data, resumed, "--max-update", "16", "--disable-validation"))
        assert f"@ {stop} updates" in proc.stdout + proc.stderr
        spawns = (proc.stdout + proc.stderr).count("EvoMoE: spawned")
        assert spawns == (1 if stop < 4 else 0), "the experts are spawned exactly once"
        # the expert compute spent continues from the checkpoint's
        assert json_logs(proc)[-1]["moe_expert_compute"] == full_log[-1]["moe_expert_compute"]
        got = model_params(resumed / "checkpoint_last.pt")
        assert got.keys() == reference.keys()
        for k in reference:
            assert torch.equal(got[k], reference[k]), f"resume from update {stop}: {k} differs"


def test_scheduled_sparsity_follows_its_schedule_and_compute_is_counted(lm_data, tmp_path):
    """--dts-sparsity scheduled: at every log line the experts per token are k(t), from E at the
    spawn down to 1 at the switch, so the switch to top-1 changes nothing in the count (nor, when
    the hard phase also takes the noisy choice, any token's expert); the expert compute spent grows
    by each update's kept assignments and is not counted for validation."""
    proc = run_cli("fairseq-train", *lm_args(lm_data, tmp_path / "ckpt", "--max-update", "16", "--dts-sparsity", "scheduled",
                                             "--dts-hard-routing", "sample", "--validate-interval-updates", "8"))
    rows = {int(r["num_updates"]): r for r in json_logs(proc)}
    # update n+1's row shows step n; T_div = 4, D = 8 (k: 4 -> 1 over updates 4..12), H = 13
    for n in range(5, 14):
        target = 4 - 3 * (n - 1 - 4) / 8
        assert rows[n]["moe_target_experts_per_token"] == pytest.approx(target, abs=1e-3)
        assert rows[n]["moe_experts_per_token"] == pytest.approx(target, rel=0.1), n
    assert rows[5]["moe_experts_per_token"] == 4.0 and rows[13]["moe_experts_per_token"] == pytest.approx(1.0, abs=0.01)
    assert all(rows[n]["moe_experts_per_token"] == 1.0 for n in range(14, 17))
    assert all(rows[n]["moe_switch_changed_pct"] == 0.0 for n in range(14, 17))  # k(t) reached 1 first
    spent = [rows[n]["moe_expert_compute"] for n in range(1, 17)]
    assert all(b > a for a, b in zip(spent, spent[1:]))
    valid = json_logs(proc, "valid")
    assert [v["valid_moe_expert_compute"] for v in valid] == [rows[8]["moe_expert_compute"], rows[16]["moe_expert_compute"]]


def test_the_paper_mode_switch_changes_routing(every_phase_lm):
    """--dts-sparsity threshold (the default): at the switch to top-1 several experts per token
    become one, and the share of tokens whose routing changes is logged."""
    rows = {int(r["num_updates"]): r for r in json_logs(every_phase_lm[1])}
    assert rows[13]["moe_experts_per_token"] > 1.0 and "moe_switch_changed_pct" not in rows[13]
    assert rows[14]["moe_experts_per_token"] == 1.0 and rows[14]["moe_switch_changed_pct"] > 0.0


def upcycle_through_every_phase(data, tmp_path, dense_model, evo_model):
    """Trains the stock dense model for 4 updates, then EvoMoE from that checkpoint
    (--finetune-from-model) into the returned directory: its first update's loss equals the dense
    model's own first update from the same checkpoint, and it goes through every phase (diversify
    2 updates, anneal 3, top-1 from update 6) with 4 experts spawned in its 2 MoE layers."""
    dense = tmp_path / "dense"
    run_cli("fairseq-train", *data, *dense_model, "--max-update", "4", "--save-dir", dense)
    start = ["--finetune-from-model", dense / "checkpoint_last.pt"]
    again = json_logs(run_cli("fairseq-train", *data, *start, *dense_model, "--max-update", "1",
                              "--save-dir", tmp_path / "again"))
    evo = tmp_path / "evo"
    proc = run_cli("fairseq-train", *data, *start, *evo_model, "--evomoe-diversify-updates", "2",
                   "--dts-anneal-updates", "3", "--dts-hard-update", "6", "--max-update", "8", "--save-dir", evo)
    rows = json_logs(proc)
    assert rows[0]["loss"] == pytest.approx(again[0]["loss"], abs=2e-3)  # logged to 3 decimals
    assert [r["moe_phase"] for r in rows] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert "EvoMoE: spawned 4 experts in each of 2 MoE layers at update 2" in proc.stdout + proc.stderr
    return evo


def test_upcycling_a_stock_dense_checkpoint(lm_data, tmp_path):
    """EvoMoE from a dense transformer_lm trained by stock fairseq (--finetune-from-model): the
    dense FFNs become the base experts, so the first update's loss equals the dense model's own
    first update from the same checkpoint; the run then spawns, sparsifies and evaluates."""
    sizes = ["--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "256",
             "--decoder-input-dim", "64", "--decoder-output-dim", "64", "--decoder-attention-heads", "2",
             "--activation-fn", "gelu", "--decoder-normalize-before", "--attention-dropout", "0.1"]
    data = [lm_data, *COMMON, "--tokens-per-sample", "64", "--max-tokens", "512", "--disable-validation", *sizes]
    evo = upcycle_through_every_phase(data, tmp_path, ["--task", "language_modeling", "--arch", "transformer_lm",
                                                       "--criterion", "cross_entropy"],
                                      ["--task", "evomoe_language_modeling", "--arch", "transformer_lm_evomoe_tiny",
                                       "--criterion", "moe_cross_entropy", "--moe-freq", "1"])
    ev = run_cli("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--path", evo / "checkpoint_last.pt", "--cpu",
                 "--tokens-per-sample", "64", "--max-tokens", "512", "--gen-subset", "test")
    eval_lm_perplexity(ev, lm_data)


def test_upcycling_a_stock_dense_translation_checkpoint(mt_data, tmp_path):
    """The same for translation: a transformer trained by stock fairseq upcycles into
    transformer_evomoe_tiny (its encoder and decoder FFNs become the base experts), the first
    update's loss equals the dense model's own first update from that checkpoint, and the
    EvoMoE run goes through every phase and translates with fairseq-generate."""
    sizes = ["--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128", "--encoder-layers", "2",
             "--encoder-attention-heads", "2", "--decoder-layers", "2", "--decoder-attention-heads", "2"]
    data = [mt_data, *COMMON, "--max-tokens", "1000", "--disable-validation", "--label-smoothing", "0.1", *sizes]
    # one MoE layer per stack (moe_freq 2): 2 in all
    evo = upcycle_through_every_phase(data, tmp_path, ["--task", "translation", "--arch", "transformer",
                                                       "--criterion", "label_smoothed_cross_entropy"],
                                      ["--task", "evomoe_translation", "--arch", "transformer_evomoe_tiny",
                                       "--criterion", "moe_label_smoothed_cross_entropy"])
    translate_test_set(mt_data, evo / "checkpoint_last.pt")
