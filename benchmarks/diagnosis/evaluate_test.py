#!/usr/bin/env python3
"""Test-split perplexity of the diagnosis study's finished language-model runs, from their final
checkpoints: the study chooses on the validation split and reports the test split.

    python benchmarks/diagnosis/evaluate_test.py [--store benchmarks/diagnosis/runs] [--gates switch,evomoe] [--seeds 4,5,6]

For every finished run (result.json and ckpt/checkpoint_last.pt) of the chosen gates and seeds
without a test.json, runs scripts/evaluate_lm.sh on the test split with the run's own block length
and task (top-1 routing, as the validation perplexity), and writes the run's test.json:
{"ppl", "loss_base2", "tokens", "checkpoint", "commit"} (the commit of the evaluating code). Runs
trained before the store kept checkpoints are listed as skipped."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from code_version import commit  # noqa: E402


def data_bin(store: Path, data: dict) -> Path:
    """The binarized folder the store prepared for a run's data settings."""
    keys = ("corpus", "script", "data_dir", "spm_vocab", "train_lines", "eval_lines")
    for settings_file in sorted((store / "data").glob("*/settings.json")):
        prepared = json.loads(settings_file.read_text())
        if prepared.get("complete") and all(prepared["settings"].get(k) == data.get(k) for k in keys):
            return settings_file.parent / "bin"
    raise FileNotFoundError(f"no prepared data in {store / 'data'} for {data}")


def runs_to_evaluate(store: Path, gates, seeds):
    """(run folder, settings) of the finished lm runs without test.json, and the folders skipped for want of a checkpoint."""
    todo, skipped = [], []
    for result_file in sorted((store / "lm").glob("*/seed*/result.json")):
        run = result_file.parent
        number = run.name[len("seed"):]
        if not number.isdigit() or (gates and run.parent.name not in gates) or (seeds and int(number) not in seeds):
            continue
        if (run / "test.json").is_file():
            continue
        if not (run / "ckpt" / "checkpoint_last.pt").is_file():
            skipped.append(run)
            continue
        todo.append((run, json.loads((run / "settings.json").read_text())))
    return todo, skipped


def evaluate(store: Path, run: Path, settings: dict) -> dict:
    ck = run / "ckpt" / "checkpoint_last.pt"
    cmd = ["bash", str(REPO / "scripts" / "evaluate_lm.sh"), "--data-bin", str(data_bin(store, settings["data"])),
           "--checkpoint", str(ck), "--subset", "test", "--tokens-per-sample", str(settings["tokens_per_sample"]),
           "--out-dir", str(run / "eval"), "--task", settings["fairseq_task"], "--cpu"]
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)  # the scripts find fairseq's tools next to this Python
    with open(run / "eval_test.out", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env=env)
    result = json.loads((run / "eval" / "ppl.test.json").read_text())
    result.update(checkpoint=str(ck.relative_to(run)), commit=commit(REPO))
    (run / "test.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=str(HERE / "runs"), help="the run store (default benchmarks/diagnosis/runs)")
    p.add_argument("--gates", default="", help="only these gates, comma-separated (default: every gate)")
    p.add_argument("--seeds", default="", help="only these seeds, comma-separated (default: every seed)")
    a = p.parse_args(argv)
    try:
        seeds = {int(x) for x in a.seeds.split(",") if x}
    except ValueError:
        p.error(f"--seeds takes seed numbers separated by commas, e.g. 4,5,6; got {a.seeds!r}")
    store = Path(a.store)
    todo, skipped = runs_to_evaluate(store, {g for g in a.gates.split(",") if g}, seeds)
    for run in skipped:
        print(f"skipped (no checkpoint kept): {run}")
    for run, settings in todo:
        result = evaluate(store, run, settings)
        print(f"{run.parent.name} seed {settings['seed']}: test ppl {result['ppl']:.2f}", flush=True)


if __name__ == "__main__":
    main()
