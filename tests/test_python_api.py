"""fairseq's Python API on MoE checkpoints, from a working directory other than the repository's:
`from_pretrained(...)` then `.translate()`, `.score()` and `.sample()`. The checkpoints are written
by fairseq-train with `--user-dir fairseq_evomoe` given as the relative path a user types."""

import json
import subprocess

import pytest

from conftest import python_for_scripts

pytestmark = pytest.mark.slow  # the checkpoints come from fairseq-train (tiny_lm_checkpoint, tiny_mt_checkpoint)


def in_other_dir(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([python_for_scripts(), "-c", code], capture_output=True, text=True, cwd=str(cwd))


def test_language_model_score_and_sample(lm_data, tiny_lm_checkpoint, tmp_path):
    save = tiny_lm_checkpoint[0]
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


def test_translation_model_translates(mt_data, tiny_mt_checkpoint, tmp_path):
    save = tiny_mt_checkpoint[0]
    code = f"""
import fairseq_evomoe
from fairseq.models.transformer import TransformerModel
mt = TransformerModel.from_pretrained({str(save)!r}, "checkpoint_last.pt", data_name_or_path={str(mt_data)!r})
print(repr(mt.translate("ein mann fährt fahrrad .", beam=2, max_len_b=10)))
"""
    proc = in_other_dir(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    translation = proc.stdout.strip().splitlines()[-1]
    assert translation.startswith("'") and len(translation) > 2, translation  # a non-empty string
