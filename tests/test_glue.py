"""GLUE fine-tuning of a pre-trained RoBERTa-EvoMoE model, end to end through the repository's
scripts: scripts/glue_from_corpus.py (GLUE-format tasks made from the shipped WikiText-2; there is no
GLUE data offline), prepare_glue.sh in its local mode, finetune_glue.sh, and the fine-tuned head
through fairseq's Python API (RobertaModel.from_pretrained(...).predict()) from another folder."""

import json
import subprocess

import pytest
import torch

from conftest import REPO, built_once, python_for_scripts, script_env

pytestmark = pytest.mark.slow  # every test trains with fairseq-train

SCRIPTS = REPO / "scripts"


def run_script(*args, cwd=None):
    env = script_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=600, env=env, cwd=cwd or REPO)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="session")
def pretrained(roberta_evomoe_pretrained):
    """roberta_evomoe_tiny pre-trained through every phase: spawn at 4, soft to 10, top-1 to 14."""
    return roberta_evomoe_pretrained[0] / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def glue_bin(lm_data, tmp_path_factory):
    """CoLA-, MRPC- and STS-B-format tasks from WikiText-2, prepared with prepare_glue.sh --tsv-dir."""
    def build(root):
        run_script(python_for_scripts(), SCRIPTS / "glue_from_corpus.py", "--out-dir", root / "tsv", "--train", "400", "--dev", "100")
        for task in ("CoLA", "MRPC", "STS-B"):
            run_script("bash", SCRIPTS / "prepare_glue.sh", "--task", task, "--dict", lm_data / "dict.txt",
                       "--tsv-dir", root / "tsv", "--out-dir", root / f"{task}-bin")
    return built_once(tmp_path_factory, "glue", build)


def finetune(task, ckpt, data, save, updates, *extra):
    return run_script("bash", SCRIPTS / "finetune_glue.sh", task, ckpt, "--data", data, "--save-dir", save, "--cpu",
                      "--updates", str(updates), "--warmup", "10", "--lr", "1e-3", "--", "--num-workers", "0",
                      "--log-interval", "1", *extra)


def test_stsb_regression_learns_with_top1_routing_and_the_balance_loss(pretrained, glue_bin, tmp_path):
    proc = finetune("STS-B", pretrained, glue_bin / "STS-B-bin", tmp_path / "ft", 60)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("STS-B dev: pearson ") and "spearman" in line and "(100 examples)" in line
    metrics = json.loads((tmp_path / "ft" / "dev_metrics.json").read_text())
    assert metrics["examples"] == 100
    # the score is the share of kept words: learnable, and learnt well above chance in 60 updates (pearson 59 here, 69 after 150)
    assert metrics["pearson"] > 30 and metrics["spearman"] > 30, metrics
    log = [json.loads(line[line.index("{"):]) for line in open(tmp_path / "ft" / "train.log") if "train_inner_loss" in line]
    assert log, "no training log lines"
    # the pre-trained routing is kept: top-1 from the first fine-tuning update; the balance loss is added
    assert all(float(r["train_moe_phase"]) == 2 and float(r["train_moe_experts_per_token"]) == 1.0 for r in log)
    assert all(float(r["train_moe_gate_loss"]) > 0 for r in log)


def test_mrpc_f1_and_python_api_predict_on_the_fine_tuned_head(pretrained, glue_bin, tmp_path):
    """--updates 3 is below the pre-training's --evomoe-diversify-updates 4: allowed, since the
    checkpoint's experts are spawned already. The head's predictions through the Python API, run
    from another folder, give the F1 and accuracy finetune_glue.sh printed."""
    data = glue_bin / "MRPC-bin"
    proc = finetune("MRPC", pretrained, data, tmp_path / "ft", 3)
    assert proc.stdout.strip().splitlines()[-1].startswith("MRPC dev: f1 ")
    metrics = json.loads((tmp_path / "ft" / "dev_metrics.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = f"""
import json, torch
import fairseq_evomoe
from fairseq.models.roberta import RobertaModel
from sklearn.metrics import f1_score
r = RobertaModel.from_pretrained({str(tmp_path / 'ft')!r}, "checkpoint_best.pt", data_name_or_path={str(data)!r}, bpe=None).eval()
d, labels = r.task.source_dictionary, r.task.label_dictionary
enc = lambda s: d.encode_line(s, append_eos=True, add_if_not_exist=False).long()
raw = {str(data / 'raw')!r}
s1, s2, gold = (open(f"{{raw}}/valid.{{k}}").read().splitlines() for k in ("input0", "input1", "label"))
preds = []
for a, b in zip(s1, s2):
    tokens = torch.cat([torch.tensor([0]), enc(a), torch.tensor([2]), enc(b)])  # <s> A </s> </s> B </s>
    preds.append(labels[r.predict("sentence_classification_head", tokens).argmax().item() + labels.nspecial])
acc = 100 * sum(p == g for p, g in zip(preds, gold)) / len(gold)
print(json.dumps({{"f1": 100 * f1_score(gold, preds, pos_label="1"), "acc": acc, "n": len(gold)}}))
"""
    out = run_script(python_for_scripts(), "-c", code, cwd=elsewhere)
    api = json.loads(out.stdout.strip().splitlines()[-1])
    assert api["n"] == metrics["examples"] == 100
    assert api["f1"] == pytest.approx(metrics["f1"]) and api["acc"] == pytest.approx(metrics["acc"])
    # the fine-tuning run stores that it restored spawned experts, so the head also loads where the
    # pre-trained checkpoint is gone (tests/test_restored_checkpoint.py)
    import fairseq_evomoe  # noqa: F401  (allowlists fairseq's checkpoint types)

    stored = torch.load(tmp_path / "ft" / "checkpoint_best.pt", map_location="cpu")["cfg"]["model"]
    assert stored.evomoe_restores_spawned_experts and stored.max_update < stored.evomoe_diversify_updates


def test_cola_prints_matthews_correlation(pretrained, glue_bin, tmp_path):
    proc = finetune("CoLA", pretrained, glue_bin / "CoLA-bin", tmp_path / "ft", 3)
    assert proc.stdout.strip().splitlines()[-1].startswith("CoLA dev: mcc ")
    metrics = json.loads((tmp_path / "ft" / "dev_metrics.json").read_text())
    assert set(metrics) == {"mcc", "acc", "examples"} and metrics["examples"] == 100
    assert -100 <= metrics["mcc"] <= 100 and 0 <= metrics["acc"] <= 100


def test_glue_scripts_reject_bad_input(lm_data, tmp_path):
    def fails(*args):
        env = script_env()
        p = subprocess.run([*map(str, args)], capture_output=True, text=True, env=env, cwd=REPO)
        assert p.returncode != 0
        return p.stderr
    assert "--task 'GLUE' is not a GLUE task" in fails("bash", SCRIPTS / "prepare_glue.sh", "--task", "GLUE", "--dict", lm_data / "dict.txt", "--tsv-dir", tmp_path)
    assert "CoLA, SST-2, MRPC" in fails("bash", SCRIPTS / "finetune_glue.sh", "WNLI", tmp_path / "x.pt")
    assert "give --tsv-dir DIR" in fails("bash", SCRIPTS / "prepare_glue.sh", "--task", "RTE", "--dict", lm_data / "dict.txt")
    assert "no train.tsv" in fails("bash", SCRIPTS / "prepare_glue.sh", "--task", "RTE", "--dict", lm_data / "dict.txt", "--tsv-dir", tmp_path)
    assert "CHECKPOINT" in fails("bash", SCRIPTS / "finetune_glue.sh", "RTE", tmp_path / "missing.pt")
