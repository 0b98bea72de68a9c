"""fairseq's Python API on MoE checkpoints, from a working directory other than the repository's:
`from_pretrained(...)` then `.translate()`, `.score()` and `.sample()`. The checkpoints are written
by fairseq-train with `--user-dir fairseq_evomoe` given as the relative path a user types."""

import json
import subprocess

import pytest

from conftest import python_for_scripts, run_cli

pytestmark = pytest.mark.slow  # trains with fairseq-train

COMMON = ["--user-dir", "fairseq_evomoe", "--cpu", "--seed", "1", "--optimizer", "adam", "--lr", "2e-3",
          "--num-workers", "0", "--max-update", "2", "--disable-validation", "--no-epoch-checkpoints"]


def in_other_dir(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([python_for_scripts(), "-c", code], capture_output=True, text=True, cwd=str(cwd))


def test_language_model_score_and_sample(lm_data, tmp_path):
    save = tmp_path / "lm"
    run_cli("fairseq-train", lm_data, *COMMON, "--task", "language_modeling", "--arch", "transformer_lm_moe_tiny",
            "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64", "--max-tokens", "512", "--save-dir", save)
    code = f"""
import json, math, fairseq_evomoe
from fairseq.models.transformer_lm import TransformerLanguageModel
lm = TransformerLanguageModel.from_pretrained({str(save)!r}, "checkpoint_last.pt", data_name_or_path={str(lm_data)!r})
lm.eval()
scores = lm.score("the city is in the north")["positional_scores"].tolist()
sample = lm.sample("the city", beam=1, sampling=True, sampling_topk=10, max_len_b=8, seed=1)
print(json.dumps({{"scores": scores, "sample": sample}}))
"""
    proc = in_other_dir(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # one log-probability per predicted token: words 2..6 and </s> (the first word has no context)
    assert len(out["scores"]) == 6 and all(s < 0 for s in out["scores"])
    assert out["sample"].startswith("the city") and len(out["sample"].split()) > 2


def test_translation_model_translates(mt_data, tmp_path):
    save = tmp_path / "mt"
    run_cli("fairseq-train", mt_data, *COMMON, "--task", "translation", "--arch", "transformer_moe_tiny",
            "--criterion", "moe_label_smoothed_cross_entropy", "--max-tokens", "1500", "--save-dir", save)
    code = f"""
import fairseq_evomoe
from fairseq.models.transformer import TransformerModel
mt = TransformerModel.from_pretrained({str(save)!r}, "checkpoint_last.pt", data_name_or_path={str(mt_data)!r})
print(repr(mt.translate("ein mann fährt fahrrad .", beam=2, max_len_b=10)))
"""
    proc = in_other_dir(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("'")
    # without the plugin imported, torch's safe loader refuses the checkpoint's config types
    bare = in_other_dir(code.replace("import fairseq_evomoe\n", ""), tmp_path)
    assert bare.returncode != 0 and "weights_only" in bare.stderr
