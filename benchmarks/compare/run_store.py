"""The resumable run store: one folder per run, <work dir>/<task>/<gate>/seed<k>.

A finished run (result.json) is reused only when the settings recorded in it equal this
invocation's (everything that feeds into its data and training, and the fairseq-train command
itself, less how often it saves checkpoints). An unfinished (crashed or interrupted) run with these
settings resumes from its last checkpoint; fairseq restores the model, optimizer, data position and
meters, and seeds every update by its number, so it ends as an uninterrupted run would. A run made
with other settings, one retrained with --force, and an unfinished run without a checkpoint are moved
aside to seed<k>.previous-<time> and trained again: an earlier result is never deleted, overwritten
or mixed with a new one, and the output says why it was retrained."""

import argparse
import itertools
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from code_version import commit
from plot_routing import parse_log, series

from . import REPO, commands, evaluation
from .data_cache import data_settings
from .flags import DTS_DEFAULTS_BEFORE, gate_options_for, split_dts_defaults, train_command
from .settings import describe_changes, read_json


def run_dir(a: argparse.Namespace, task: str, gate: str, seed: int) -> Path:
    """The folder of one run."""
    return a.work_dir / task / gate / f"seed{seed}"


def move_aside(path: Path) -> Path:
    """Rename `path` to a sibling <name>.previous-<time>[-n] that does not exist yet; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        dest = path.with_name(f"{path.name}.previous-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not dest.exists():
            path.rename(dest)
            return dest


def portable_command(cmd: List[str], data: Path, folder: Path) -> List[str]:
    """A training command with the run, data and repository paths replaced by placeholders, and the
    fairseq-train path by its name: equal for equal settings wherever the files are."""
    subs = [(str(folder), "<run>"), (str(data), "<data>"), (str(REPO), "<repo>")]
    norm = ["fairseq-train"]
    for c in cmd[1:]:
        for old, new in subs:
            c = c.replace(old, new)
        norm.append(c)
    return norm


def run_settings(a: argparse.Namespace, task: str, gate: str, seed: int, data: Path, folder: Path) -> dict:
    """Everything that decides a run's result: stored in result.json; a result is reused only when
    its settings equal these (the training command too, with paths replaced by placeholders)."""
    task_name, gate_args = gate_options_for(a, gate, task)
    s = {
        "task": task, "gate": gate, "seed": seed, "updates": a.updates, "size": a.size, "experts": a.experts,
        "max_tokens": a.max_tokens, "lr": a.lr, "balance_wt": a.balance_wt, "validations": a.validations,
        "max_valid_steps": a.max_valid_steps, "device": "gpu" if a.gpu else "cpu", "fairseq_task": task_name,
        "gate_options": gate_args, "data": data_settings(a, task),
    }
    if task == "lm":
        s["tokens_per_sample"] = a.tokens_per_sample
    s["train_command"] = portable_command(train_command(a, task, gate, seed, data, folder), data, folder)
    return s


def recorded_settings(folder: Path) -> Optional[dict]:
    """The settings an unfinished run was started with (its settings.json); None without one."""
    return read_json(folder / "settings.json") if (folder / "settings.json").is_file() else None


# fairseq-train flags that set only how often a run saves checkpoints, not what it computes
CHECKPOINT_CADENCE_FLAGS = ("--save-interval-updates",)


def same_settings(old: Optional[dict], new: dict) -> bool:
    """Whether a run made with `old` settings is the run `new` asks for: equal, apart from the
    checkpoint cadence (runs made before checkpoints were saved at every validation are reused) and
    the place of the DTS options the harness now always passes (flags.DTS_DEFAULTS; a command
    recorded without them ran with their defaults of the time)."""
    def comparable(s: dict) -> dict:
        cmd = list(s.get("train_command") or [])
        for flag in CHECKPOINT_CADENCE_FLAGS:
            if flag in cmd:
                i = cmd.index(flag)
                del cmd[i : i + 2]
        cmd, dts = split_dts_defaults(cmd, DTS_DEFAULTS_BEFORE)
        gate_options, _ = split_dts_defaults(list(s.get("gate_options") or []), DTS_DEFAULTS_BEFORE)
        return dict(s, train_command=cmd, gate_options=gate_options, dts_options=dts)
    return isinstance(old, dict) and comparable(old) == comparable(new)


INTERVAL_CHECKPOINT = re.compile(r"checkpoint_\d+_(\d+)\.pt")


def resume_point(a: argparse.Namespace, folder: Path, settings: dict) -> Optional[int]:
    """The update an unfinished run with these settings resumes from: that of its newest interval
    checkpoint (checkpoint_<epoch>_<update>.pt, written atomically by fairseq), which then replaces
    checkpoint_last.pt (a copy fairseq may have been interrupted writing). None: nothing to resume
    (finished, --force, other settings, or no checkpoint)."""
    ckpt = folder / "ckpt"
    if a.force or (folder / "result.json").exists() or not ckpt.is_dir():
        return None
    if not same_settings(recorded_settings(folder), settings):
        return None
    saved = [(int(m.group(1)), p) for p in ckpt.iterdir() if (m := INTERVAL_CHECKPOINT.fullmatch(p.name))]
    if not saved:
        return None
    update, newest = max(saved)
    tmp = ckpt / "checkpoint_last.pt.resume-tmp"
    shutil.copyfile(newest, tmp)
    os.replace(tmp, ckpt / "checkpoint_last.pt")
    return update


def earlier_result(a: argparse.Namespace, folder: Path, settings: dict, tag: str) -> Optional[dict]:
    """The run's earlier result when it was made with `settings` (and no --force); otherwise None,
    with whatever the folder holds (a result with other or unknown settings, or an unfinished run)
    moved aside and the reason printed."""
    result_file = folder / "result.json"
    if result_file.is_file():
        have = read_json(result_file)
        old = have.get("settings") if isinstance(have, dict) else None
        if same_settings(old, settings) and not a.force:
            commands.log(f"{tag}: done earlier with the same settings ({result_file})")
            return one_line_per_update(have)
        if same_settings(old, settings):
            why = "--force"
        elif old is None:
            why = "its result.json does not record the settings it was made with"
        else:
            changes = [c for c in describe_changes(old, settings) if c != "train_command changed"]
            why = "settings changed: " + ", ".join(changes or ["the fairseq-train command"])
        prev = move_aside(folder)
        commands.log(f"{tag}: {why}; the earlier run was moved to {prev}; training again")
    elif folder.is_dir() and any(folder.iterdir()):
        # an unfinished run (crashed or interrupted) starts over, not from a half-written state; what it
        # saved (a checkpoint may be complete if evaluation failed) is moved aside, never deleted
        same = same_settings(recorded_settings(folder), settings)
        prev = move_aside(folder)
        commands.log(f"{tag}: an unfinished run with {'the same' if same else 'other or unknown'} settings was moved to {prev}")
    return None


def valid_curve(parsed: dict) -> Tuple[list, list]:
    """(updates, validation loss) of a parsed log; the pure task loss (inner_loss) where it is logged."""
    key = "inner_loss" if series(parsed["valid"], "inner_loss")[0] else "loss"
    return series(parsed["valid"], key)


def mean_experts_per_token(parsed: dict) -> Optional[float]:
    """Mean experts per token over the training log intervals; None without MoE layers."""
    recs = [r for r in parsed["train"] if r.get("moe_experts_per_token") is not None]
    if not recs:
        return None
    return sum(r["moe_experts_per_token"] for r in recs) / len(recs)  # log intervals have equal length


TRAIN_CURVE_KEYS = ("inner_loss", "loss", "moe_experts_per_token", "moe_expert_compute", "moe_switch_changed_pct")


def train_curve(parsed: dict) -> Dict[str, list]:
    """The training log's curves kept in result.json (a run's folder may lose its log, its result may
    not): per log line the update, and each of TRAIN_CURVE_KEYS the run logs (None where a line lacks it;
    moe_expert_compute is cumulative, in token-expert assignments since update 0)."""
    recs = [r for r in parsed["train"] if r.get("num_updates") is not None]
    curve = {"updates": [r["num_updates"] for r in recs]}
    for k in TRAIN_CURVE_KEYS:
        if any(r.get(k) is not None for r in recs):
            curve[k] = [r.get(k) for r in recs]
    return curve


def one_line_per_update(result: dict) -> dict:
    """A stored result with one validation and one training line per update, the last stored (the
    log parser of results made before it kept only one stored, for a resumed run, also the lines
    its interrupted attempt had logged, up to several copies of each), and its mean experts per
    token taken again over those lines."""
    def last_per_update(updates: list, *columns: list):
        last = {u: i for i, u in enumerate(updates)}
        keep = sorted(last.values(), key=lambda i: updates[i])
        return [[col[i] for i in keep] for col in (updates, *columns)]

    out = dict(result)
    if out.get("valid_updates") is not None and len(set(out["valid_updates"])) < len(out["valid_updates"]):
        out["valid_updates"], out["valid_loss"] = last_per_update(out["valid_updates"], out["valid_loss"])
    curve = out.get("train_curve") or {}
    ups = curve.get("updates") or []
    if len(set(ups)) < len(ups):
        keys = [k for k in curve if k != "updates"]
        columns = last_per_update(ups, *(curve[k] for k in keys))
        out["train_curve"] = dict(zip(["updates", *keys], columns))
        ept = [v for v in out["train_curve"].get("moe_experts_per_token") or [] if v is not None]
        if ept:
            out["experts_per_token"] = sum(ept) / len(ept)
    return out


def finished_result(a: argparse.Namespace, task: str, gate: str, seed: int, data: Path) -> Optional[dict]:
    """The run's result when it finished with this invocation's settings; None otherwise. Reads only:
    nothing is moved aside (--report-only)."""
    folder = run_dir(a, task, gate, seed)
    have = read_json(folder / "result.json") if (folder / "result.json").is_file() else None
    if isinstance(have, dict) and same_settings(have.get("settings"), run_settings(a, task, gate, seed, data, folder)):
        return one_line_per_update(have)
    return None


def run_one(a: argparse.Namespace, task: str, gate: str, seed: int, data: Path, env: Dict[str, str],
            idx: int, total: int) -> dict:
    """One run's result: the earlier one when made with the same settings, else trained and evaluated
    now. settings.json is written before training (what an unfinished run was started with) and
    result.json, with the settings, only once evaluation succeeded. RuntimeError when a tool fails."""
    folder = run_dir(a, task, gate, seed)
    tag = f"[{idx}/{total}] {task} {gate} seed {seed}"
    settings = run_settings(a, task, gate, seed, data, folder)
    resumed = resume_point(a, folder, settings)
    if resumed is None:
        have = earlier_result(a, folder, settings, tag)
        if have is not None:
            return have
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.json").write_text(json.dumps(settings, indent=1))
        commands.log(f"{tag}: training {a.updates} updates ...")
    else:
        if (folder / "train.out").exists():  # the interrupted attempt's output is kept
            move_aside(folder / "train.out")
        commands.log(f"{tag}: resuming the unfinished run from its checkpoint at update {resumed} ...")
    t0 = time.time()
    commands.run_command(train_command(a, task, gate, seed, data, folder), folder / "train.out", env)
    wall = time.time() - t0
    parsed = parse_log(folder / "train.log")
    xs, ys = valid_curve(parsed)
    res = {
        "task": task, "gate": gate, "seed": seed, "updates": a.updates, "train_wall_s": wall,
        "wall_sharing": {"jobs": a.jobs, "threads": a.threads},
        "resumed_from_update": resumed, "commit": commit(REPO),
        "valid_updates": xs, "valid_loss": ys, "final_valid_loss": ys[-1] if ys else None,
        "experts_per_token": mean_experts_per_token(parsed), "train_curve": train_curve(parsed),
    }
    t1 = time.time()
    res.update(evaluation.evaluate(a, task, gate, data, folder, env))
    res["eval_wall_s"] = time.time() - t1
    res["settings"] = settings
    (folder / "result.json").write_text(json.dumps(res, indent=1))
    metric = f"valid ppl {res['ppl']:.2f}" if task == "lm" else f"test BLEU {res['bleu']:.2f}"
    commands.log(f"{tag}: {metric}, final valid loss {res['final_valid_loss']:.3f}, train {wall:.0f} s, eval {res['eval_wall_s']:.0f} s")
    return res
