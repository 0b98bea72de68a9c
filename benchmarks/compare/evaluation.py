"""Evaluation of a trained run with the repository's scripts: validation perplexity per subword
(scripts/evaluate_lm.sh) for lm, test BLEU with beam 5 (scripts/evaluate_translation.sh) for mt."""

import argparse
import json
from pathlib import Path
from typing import Dict, List

from . import SCRIPTS, commands
from .flags import gate_options_for


def final_checkpoint(run_dir: Path) -> Path:
    """The run's checkpoint at its final update; RuntimeError (a failed run) when training wrote none."""
    ck = run_dir / "ckpt" / "checkpoint_last.pt"
    if not ck.is_file():
        raise RuntimeError(f"training wrote no {ck}")
    return ck


def eval_command(a: argparse.Namespace, task: str, gate: str, data: Path, ck: Path, ev: Path) -> List[str]:
    """The evaluation script's call for checkpoint `ck`, writing into `ev`. The task is passed
    explicitly, which saves the scripts reading it from the checkpoint."""
    task_args = ["--task", gate_options_for(a, gate, task)[0]]
    if task == "lm":
        cmd = ["bash", str(SCRIPTS / "evaluate_lm.sh"), "--data-bin", str(data / "bin"), "--checkpoint", str(ck),
               "--subset", "valid", "--tokens-per-sample", str(a.tokens_per_sample), "--out-dir", str(ev), *task_args]
    else:
        cmd = ["bash", str(SCRIPTS / "evaluate_translation.sh"), "--data-bin", str(data / "bin"), "--checkpoint", str(ck),
               "--subset", "test", "--ref", str(data / "raw" / "test.en"), "--out-dir", str(ev), "--beam", "5",
               "--max-len-a", "1.5", "--max-len-b", "10", *task_args]
    if not a.gpu:
        cmd.append("--cpu")
    return cmd


def evaluate(a: argparse.Namespace, task: str, gate: str, data: Path, run_dir: Path, env: Dict[str, str]) -> dict:
    """Evaluate the run's final checkpoint: {"ppl": ..., ...} (evaluate_lm.sh's JSON) for lm, {"bleu": ...} for mt."""
    ck = final_checkpoint(run_dir)
    ev = run_dir / "eval"
    commands.run_command(eval_command(a, task, gate, data, ck, ev), run_dir / "eval.out", env)
    if task == "lm":
        return json.loads((ev / "ppl.valid.json").read_text())
    return {"bleu": json.loads((ev / "bleu.test.json").read_text())["score"]}
