"""Prepared data: WikiText-2 (lm) and Multi30k (mt), binarized once per data setting by the
repository's prepare_*.sh scripts (sentencepiece, a small vocabulary for CPU speed).

Each prepared folder, <work dir>/data/<corpus>_spm<V>[_<N>l_<M>e], holds settings.json:
{"settings": {...}, "complete": bool}. A folder is used only when its settings equal this
invocation's and its preparation completed; a folder with other or unknown settings is left as it
is and the next free <name>-2, -3, ... is prepared instead, so no data is overwritten or mixed."""

import argparse
import itertools
import json
from pathlib import Path
from typing import Dict, List, Tuple

from . import SCRIPTS, commands
from .settings import describe_changes, read_json

DATA_JOBS = {  # task: (preparation script, corpus name, a file that exists once preparation finished)
    "lm": ("prepare_wikitext.sh", "wikitext-2", "bin/train.bin"),
    "mt": ("prepare_multi30k.sh", "multi30k_de_en", "bin/train.de-en.de.bin"),
}

DATA_SETTINGS = "settings.json"  # in every prepared data folder: {"settings": {...}, "complete": bool}


def data_settings(a: argparse.Namespace, task: str) -> dict:
    """Everything that decides a task's prepared data."""
    script, corpus, _ = DATA_JOBS[task]
    return {
        "corpus": corpus, "script": script, "data_dir": str(a.data_dir) if a.data_dir else None,
        "spm_vocab": a.spm_vocab, "train_lines": a.train_lines or "all",
        "eval_lines": a.eval_lines if a.train_lines else "all",
    }


def locate_data(a: argparse.Namespace, task: str) -> Tuple[Path, bool, List[str]]:
    """(folder, ready, notes): the data folder for this invocation's settings. The name carries the
    vocabulary and line counts; the folder's settings.json must match all settings to be used. A
    folder prepared with other or unknown settings is left alone and the next free <name>-<n> is
    taken. ready: prepared completely with these settings. No side effects (also used by --dry-run)."""
    want = data_settings(a, task)
    name = f"{DATA_JOBS[task][1]}_spm{a.spm_vocab}" + (f"_{a.train_lines}l_{a.eval_lines}e" if a.train_lines else "")
    base = a.work_dir / "data" / name
    notes = []
    for n in itertools.count(1):
        dest = base if n == 1 else base.with_name(f"{name}-{n}")
        if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
            return dest, False, notes
        have = read_json(dest / DATA_SETTINGS)
        if isinstance(have, dict) and have.get("settings") == want:
            return dest, bool(have.get("complete")) and (dest / DATA_JOBS[task][2]).is_file(), notes
        why = ("other settings (" + ", ".join(describe_changes(have.get("settings"), want)) + ")"
               if isinstance(have, dict) else f"unknown settings (no {DATA_SETTINGS})")
        notes.append(f"{dest} holds data prepared with {why}: left as it is, not used")


def data_dirs(a: argparse.Namespace) -> Dict[str, Path]:
    """The data folder of every task, without preparing anything."""
    return {t: locate_data(a, t)[0] for t in a.tasks}


def prepare_command(a: argparse.Namespace, task: str, dest: Path) -> List[str]:
    """The prepare_*.sh call that writes the task's data for this invocation's settings into `dest`."""
    cmd = ["bash", str(SCRIPTS / DATA_JOBS[task][0]), "--out-dir", str(dest), "--spm-vocab", str(a.spm_vocab)]
    if a.data_dir:
        cmd += ["--data-dir", str(a.data_dir)]
    if a.train_lines:
        cmd += ["--train-lines", str(a.train_lines), "--valid-lines", str(a.eval_lines), "--test-lines", str(a.eval_lines)]
    return cmd


def prepare_data(a: argparse.Namespace, env: Dict[str, str]) -> Dict[str, Path]:
    """Every task's data folder (task -> folder), prepared now unless complete with these settings.
    settings.json is written before preparing (complete: false) and again after it succeeded, so an
    interrupted preparation is recognised as unfinished and done again; a failure ends the comparison."""
    out = {}
    for task in a.tasks:
        dest, ready, notes = locate_data(a, task)
        for note in notes:
            commands.log(f"data: {note}")
        out[task] = dest
        if ready:
            commands.log(f"data: {task} prepared earlier with these settings: {dest}")
            continue
        cmd = prepare_command(a, task, dest)
        dest.mkdir(parents=True, exist_ok=True)
        settings = {"settings": data_settings(a, task), "complete": False}
        (dest / DATA_SETTINGS).write_text(json.dumps(settings, indent=1))
        commands.log(f"preparing data: {DATA_JOBS[task][0]} -> {dest} (log: {dest / 'prepare.log'})")
        try:
            commands.run_command(cmd, dest / "prepare.log", env)
        except RuntimeError as e:
            raise SystemExit(f"data preparation failed: {e}")
        settings["complete"] = True
        (dest / DATA_SETTINGS).write_text(json.dumps(settings, indent=1))
    return out
