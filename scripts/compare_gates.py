#!/usr/bin/env python3
"""The EvoMoE paper's comparison at small scale, on real data: every gate trained with the same
model, data, number of updates and seeds, then evaluated; writes a Markdown report with plots.

Tasks
  lm   GPT-style MoE language model on WikiText-2 (sentencepiece 4k vocabulary); metric: validation
       perplexity (fairseq-eval-lm on the full valid split, per subword) at the final update
  mt   MoE transformer on Multi30k De->En (sentencepiece 4k joint vocabulary); metric: test BLEU
       (test_2016_flickr, beam 5, detokenised sacrebleu) at the final update

Gates come from configs/gate/<gate>.yaml (the same files fairseq-hydra-train uses), turned into
fairseq-train options; gate=evomoe also switches to the evomoe_* phase task.

For each task the report gives, per gate (mean +- std over seeds): the metric at equal updates,
the final validation loss, the updates needed to reach the Switch baseline's final validation loss
(linear interpolation between validations; per seed against that seed's Switch run), training
wall-clock, and the mean number of experts per token over training.

Default: 7 gates x 3 seeds x 2 tasks, tiny models, 200 updates of 1,536 tokens: measured 54 minutes
on a 2-core CPU machine with --jobs 2 (two runs at a time, 1 thread each).
Runs are resumable: a finished run (its result.json) is not trained again when it was made with the
same settings (everything these options feed into its data and training, and the fairseq-train
command itself, recorded in result.json). A run made with other settings, or retrained with --force, is moved aside to
<work dir>/<task>/<gate>/seed<k>.previous-<time> and trained again, as is an unfinished (crashed) run;
the output says so. Prepared data
goes to <work dir>/data/<corpus>_spm<V>[_<N>l_<M>e] with its settings in settings.json; data prepared
with other settings is never reused (a new folder <name>-2, -3, ... is prepared instead).

  python scripts/compare_gates.py --jobs 2                         # the default comparison
  python scripts/compare_gates.py --tasks lm --gates switch,evomoe --seeds 1 --updates 20   # smoke
  python scripts/compare_gates.py --gpu --size small --updates 20000 --seeds 1,2,3       # bigger, GPU
"""

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

from plot_routing import make_plots, parse_log, series  # noqa: E402

ALL_GATES = ["dense", "switch", "top2", "base", "hash", "stablemoe", "dense_moe", "evomoe"]
DEFAULT_GATES = ["dense", "switch", "top2", "base", "hash", "stablemoe", "evomoe"]
TASKS = {"lm": "language_modeling", "mt": "translation"}

# model sizes: (layers per stack, model dim, ffn dim, heads); moe_freq 2 -> every other layer is MoE
SIZES = {
    "tiny": (2, 64, 256, 2),
    "small": (4, 128, 512, 4),
    "base": (6, 512, 2048, 8),
}


def log(msg):
    print(msg + "\n", end="", flush=True)  # one write: lines of concurrent jobs do not interleave


def fairseq_tool(name):
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


def gate_options(gate, task):
    """fairseq-train options (and the task name) from configs/gate/<gate>.yaml and configs/evomoe_task."""
    from omegaconf import OmegaConf

    path = REPO / "configs" / "gate" / f"{gate}.yaml"
    if not path.is_file():
        raise SystemExit(f"--gates: no config {path} for gate {gate!r}; choose from {', '.join(ALL_GATES)}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    args = []
    for k, v in cfg.items():
        if isinstance(v, str) and v.startswith("${"):
            continue  # e.g. max_update: ${optimization.max_update} (Hydra only; fairseq-train gets --max-update)
        flag = "--" + str(k).replace("_", "-")
        if isinstance(v, bool):
            if v:
                args.append(flag)
        else:
            args += [flag, str(v)]
    task_name = TASKS[task]
    evo = REPO / "configs" / "evomoe_task" / f"{gate}_{task_name}.yaml"
    if evo.is_file():
        task_name = OmegaConf.load(evo)._name
    return task_name, args


def gate_options_for(a, gate, task):
    """gate_options with this invocation's EvoMoE choices (--spawn-mode, --tau-schedule) filled in."""
    task_name, args = gate_options(gate, task)
    for flag, val in (("--evomoe-spawn-mode", a.spawn_mode), ("--dts-tau-schedule", a.tau_schedule)):
        if flag in args:
            args[args.index(flag) + 1] = val
    return task_name, args


def describe_changes(old, new, prefix=""):
    """Human-readable differences between two settings dicts, e.g. ["updates 20 -> 200"]."""
    out = []
    old = old if isinstance(old, dict) else {}
    for k in list(new) + [k for k in old if k not in new]:
        o, n = old.get(k), new.get(k)
        if o == n:
            continue
        if isinstance(o, dict) and isinstance(n, dict):
            out += describe_changes(o, n, f"{prefix}{k}.")
        elif isinstance(o, (list, dict)) or isinstance(n, (list, dict)):
            out.append(f"{prefix}{k} changed")
        else:
            out.append(f"{prefix}{k} {o} -> {n}")
    return out


def move_aside(path):
    """Rename `path` to a sibling <name>.previous-<time>[-n] that does not exist yet; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        dest = path.with_name(f"{path.name}.previous-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not dest.exists():
            path.rename(dest)
            return dest


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


DATA_JOBS = {
    "lm": ("prepare_wikitext.sh", "wikitext-2", "bin/train.bin"),
    "mt": ("prepare_multi30k.sh", "multi30k_de_en", "bin/train.de-en.de.bin"),
}


DATA_SETTINGS = "settings.json"  # in every prepared data folder: {"settings": {...}, "complete": bool}


def data_settings(a, task):
    """Everything that decides a task's prepared data."""
    script, corpus, _ = DATA_JOBS[task]
    return {
        "corpus": corpus, "script": script, "data_dir": str(a.data_dir) if a.data_dir else None,
        "spm_vocab": a.spm_vocab, "train_lines": a.train_lines or "all",
        "eval_lines": a.eval_lines if a.train_lines else "all",
    }


def locate_data(a, task):
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
        have = _read_json(dest / DATA_SETTINGS)
        if isinstance(have, dict) and have.get("settings") == want:
            return dest, bool(have.get("complete")) and (dest / DATA_JOBS[task][2]).is_file(), notes
        why = ("other settings (" + ", ".join(describe_changes(have.get("settings"), want)) + ")"
               if isinstance(have, dict) else f"unknown settings (no {DATA_SETTINGS})")
        notes.append(f"{dest} holds data prepared with {why}: left as it is, not used")


def data_dirs(a):
    return {t: locate_data(a, t)[0] for t in a.tasks}


def prepare_data(a, env):
    """Binarize WikiText-2 and Multi30k once per setting (sentencepiece, small vocabulary for CPU speed)."""
    out = {}
    for task in a.tasks:
        dest, ready, notes = locate_data(a, task)
        for note in notes:
            log(f"data: {note}")
        out[task] = dest
        if ready:
            log(f"data: {task} prepared earlier with these settings: {dest}")
            continue
        script = DATA_JOBS[task][0]
        cmd = ["bash", str(SCRIPTS / script), "--out-dir", str(dest), "--spm-vocab", str(a.spm_vocab)]
        if a.data_dir:
            cmd += ["--data-dir", str(a.data_dir)]
        if a.train_lines:
            cmd += ["--train-lines", str(a.train_lines), "--valid-lines", str(a.eval_lines), "--test-lines", str(a.eval_lines)]
        dest.mkdir(parents=True, exist_ok=True)
        settings = {"settings": data_settings(a, task), "complete": False}
        (dest / DATA_SETTINGS).write_text(json.dumps(settings, indent=1))
        log(f"preparing data: {script} -> {dest} (log: {dest / 'prepare.log'})")
        try:
            _run(cmd, dest / "prepare.log", env)
        except RuntimeError as e:
            raise SystemExit(f"data preparation failed: {e}")
        settings["complete"] = True
        (dest / DATA_SETTINGS).write_text(json.dumps(settings, indent=1))
    return out


def train_command(a, task, gate, seed, data, run_dir):
    layers, dim, ffn, heads = SIZES[a.size]
    task_name, gate_args = gate_options_for(a, gate, task)
    n = a.updates
    common = [
        fairseq_tool("fairseq-train"), str(data / "bin"), "--user-dir", str(REPO / "fairseq_evomoe"),
        "--task", task_name, "--seed", str(seed), "--max-update", str(n),
        "--moe-expert-count", str(a.experts), "--moe-freq", "2",
        "--stablemoe-stage2-update", str(max(1, round(0.1 * n))),
        "--moe-gate-loss-wt", str(a.balance_wt), "--moe-log-expert-load",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(a.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(1, n // 10)),
        "--max-tokens", str(a.max_tokens), "--save-dir", str(run_dir / "ckpt"),
        "--no-epoch-checkpoints", "--save-interval", "1000000", "--save-interval-updates", str(n),
        "--keep-interval-updates", "1", "--validate-interval", "1000000",
        "--validate-interval-updates", str(max(1, n // a.validations)), "--max-valid-steps", str(a.max_valid_steps),
        "--log-format", "json", "--log-interval", str(max(1, min(10, n // 20))),
        "--log-file", str(run_dir / "train.log"), "--num-workers", "0",
    ]
    if not a.gpu:
        common.append("--cpu")
    if task == "lm":
        common += [
            "--arch", "transformer_lm_moe_tiny", "--decoder-layers", str(layers), "--decoder-embed-dim", str(dim),
            "--decoder-ffn-embed-dim", str(ffn), "--decoder-attention-heads", str(heads),
            "--share-decoder-input-output-embed", "--tokens-per-sample", str(a.tokens_per_sample),
            "--sample-break-mode", "none", "--criterion", "moe_cross_entropy",
        ]
    else:
        common += [
            "-s", "de", "-t", "en", "--arch", "transformer_moe_tiny",
            "--encoder-layers", str(layers), "--decoder-layers", str(layers),
            "--encoder-embed-dim", str(dim), "--decoder-embed-dim", str(dim),
            "--encoder-ffn-embed-dim", str(ffn), "--decoder-ffn-embed-dim", str(ffn),
            "--encoder-attention-heads", str(heads), "--decoder-attention-heads", str(heads),
            "--share-all-embeddings", "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--dropout", "0.1",
        ]
    return common + gate_args


def final_checkpoint(run_dir):
    ck = run_dir / "ckpt" / "checkpoint_last.pt"
    if not ck.is_file():
        raise RuntimeError(f"training wrote no {ck}")
    return ck


def evaluate(a, task, gate, data, run_dir, env):
    ck = final_checkpoint(run_dir)
    task_args = ["--task", gate_options_for(a, gate, task)[0]]  # saves the scripts reading it from the checkpoint
    ev = run_dir / "eval"
    if task == "lm":
        cmd = ["bash", str(SCRIPTS / "evaluate_lm.sh"), "--data-bin", str(data / "bin"), "--checkpoint", str(ck),
               "--subset", "valid", "--tokens-per-sample", str(a.tokens_per_sample), "--out-dir", str(ev), *task_args]
        if not a.gpu:
            cmd.append("--cpu")
        _run(cmd, run_dir / "eval.out", env)
        return json.loads((ev / "ppl.valid.json").read_text())
    cmd = ["bash", str(SCRIPTS / "evaluate_translation.sh"), "--data-bin", str(data / "bin"), "--checkpoint", str(ck),
           "--subset", "test", "--ref", str(data / "raw" / "test.en"), "--out-dir", str(ev), "--beam", "5",
           "--max-len-a", "1.5", "--max-len-b", "10", *task_args]
    if not a.gpu:
        cmd.append("--cpu")
    _run(cmd, run_dir / "eval.out", env)
    return {"bleu": json.loads((ev / "bleu.test.json").read_text())["score"]}


def _run(cmd, out_file, env):
    with open(out_file, "w") as out:
        out.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        tail = Path(out_file).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}); log {out_file}:\n{tail}")


def valid_curve(parsed):
    key = "inner_loss" if series(parsed["valid"], "inner_loss")[0] else "loss"
    return series(parsed["valid"], key)


def mean_experts_per_token(parsed):
    recs = [r for r in parsed["train"] if r.get("moe_experts_per_token") is not None]
    if not recs:
        return None
    return sum(r["moe_experts_per_token"] for r in recs) / len(recs)  # log intervals have equal length


def updates_to_reach(xs, ys, target):
    """First update at which the validation loss reaches `target` (linear interpolation)."""
    prev = None
    for x, y in zip(xs, ys):
        if y <= target:
            if prev is None or prev[1] == y:
                return x
            (x0, y0) = prev
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
        prev = (x, y)
    return None


def run_settings(a, task, gate, seed, data, run_dir):
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
    cmd = train_command(a, task, gate, seed, data, run_dir)
    subs = [(str(run_dir), "<run>"), (str(data), "<data>"), (str(REPO), "<repo>")]
    norm = ["fairseq-train"]
    for c in cmd[1:]:
        for old, new in subs:
            c = c.replace(old, new)
        norm.append(c)
    s["train_command"] = norm
    return s


def run_one(a, task, gate, seed, data, env, idx, total):
    run_dir = a.work_dir / task / gate / f"seed{seed}"
    result_file = run_dir / "result.json"
    started_file = run_dir / "settings.json"  # written before training: what a crashed run was started with
    tag = f"[{idx}/{total}] {task} {gate} seed {seed}"
    settings = run_settings(a, task, gate, seed, data, run_dir)
    if result_file.is_file():
        have = _read_json(result_file)
        old = have.get("settings") if isinstance(have, dict) else None
        if old == settings and not a.force:
            log(f"{tag}: done earlier with the same settings ({result_file})")
            return have
        if old == settings:
            why = "--force"
        elif old is None:
            why = "its result.json does not record the settings it was made with"
        else:
            changes = [c for c in describe_changes(old, settings) if c != "train_command changed"]
            why = "settings changed: " + ", ".join(changes or ["the fairseq-train command"])
        prev = move_aside(run_dir)
        log(f"{tag}: {why}; the earlier run was moved to {prev}; training again")
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        # an unfinished run (crashed or interrupted) starts over, not from a half-written state; what it
        # saved (a checkpoint may be complete if evaluation failed) is moved aside, never deleted
        same = _read_json(started_file) == settings
        prev = move_aside(run_dir)
        log(f"{tag}: an unfinished run with {'the same' if same else 'other or unknown'} settings was moved to {prev}")
    run_dir.mkdir(parents=True, exist_ok=True)
    started_file.write_text(json.dumps(settings, indent=1))
    cmd = train_command(a, task, gate, seed, data, run_dir)
    log(f"{tag}: training {a.updates} updates ...")
    t0 = time.time()
    _run(cmd, run_dir / "train.out", env)
    wall = time.time() - t0
    parsed = parse_log(run_dir / "train.log")
    xs, ys = valid_curve(parsed)
    res = {
        "task": task, "gate": gate, "seed": seed, "updates": a.updates, "train_wall_s": wall,
        "valid_updates": xs, "valid_loss": ys, "final_valid_loss": ys[-1] if ys else None,
        "experts_per_token": mean_experts_per_token(parsed),
    }
    t1 = time.time()
    res.update(evaluate(a, task, gate, data, run_dir, env))
    res["eval_wall_s"] = time.time() - t1
    res["settings"] = settings
    result_file.write_text(json.dumps(res, indent=1))
    metric = f"valid ppl {res['ppl']:.2f}" if task == "lm" else f"test BLEU {res['bleu']:.2f}"
    log(f"{tag}: {metric}, final valid loss {res['final_valid_loss']:.3f}, train {wall:.0f} s, eval {res['eval_wall_s']:.0f} s")
    return res


def _ms(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def summary_lines(rows, gates, mkey, higher_is_better):
    """Plain-language reading of one task's table: the ranking, and EvoMoE against Switch."""
    means = {}
    for gate in gates:
        vals = [r[mkey] for r in rows if r["gate"] == gate and r.get(mkey) is not None]
        if vals:
            means[gate] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
    if not means:
        return []
    ranked = sorted(means, key=lambda g: means[g][0], reverse=higher_is_better)
    out = ["", "Ranking by the mean over seeds (best first): " + ", ".join(f"{g} {means[g][0]:.2f}" for g in ranked) + "."]
    if "evomoe" in means and "switch" in means:
        (e, es, n), (w, ws, _) = means["evomoe"], means["switch"]
        better = (e > w) if higher_is_better else (e < w)
        spread = max(es, ws)
        verdict = "within the seed-to-seed spread" if abs(e - w) <= spread else ("better" if better else "worse")
        out.append(
            f"EvoMoE vs Switch: {e:.2f} vs {w:.2f} ({'better' if better else 'worse'} by {abs(e - w):.2f}; "
            f"largest seed std {spread:.2f}: {verdict}), over {n} seed(s)."
        )
    return out


def write_report(a, results, cmdline):
    res_path = Path(a.results)
    plot_dir = res_path.parent / (res_path.stem + "_plots")
    lines = [
        "# Gate comparison: EvoMoE vs. the baselines (small scale, real data)",
        "",
        f"Written by `scripts/compare_gates.py` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"Command: `{cmdline}`",
        "",
    ]
    if a.note:
        lines += [f"> **Note:** {a.note}", ""]
    lines += [
        "## Setting",
        "",
        f"- Model size `{a.size}` {SIZES[a.size]} (layers per stack, dim, FFN, heads), {a.experts} experts in every "
        f"other FFN (`--moe-freq 2`), balance-loss weight {a.balance_wt}, Adam (0.9, 0.98), lr {a.lr} inverse_sqrt "
        f"with {max(1, a.updates // 10)} warm-up updates, {a.max_tokens} tokens per update, {a.updates} updates, "
        f"seeds {', '.join(map(str, a.seeds))}, {'GPU' if a.gpu else 'CPU'}; {a.jobs} run(s) at a time"
        f"{f', {a.threads} thread(s) each' if a.threads else ''} (train wall-clock is measured under that sharing).",
        f"- Data: {'the first %d training lines/pairs and %d valid/test lines of each corpus' % (a.train_lines, a.eval_lines) if a.train_lines else 'the full corpora'}"
        f"; sentencepiece (unigram, {a.spm_vocab} pieces).",
        f"- LM: WikiText-2, blocks of {a.tokens_per_sample} tokens; perplexity is per subword on the valid split "
        "(fairseq-eval-lm, top-1 routing at evaluation).",
        "- MT: Multi30k De->En, joint vocabulary; BLEU on test_2016_flickr, beam 5 (hypotheses "
        "at most 1.5 x source + 10 subwords), detokenised sacrebleu.",
        f"- Intermediate validations every {max(1, a.updates // a.validations)} updates on the first "
        f"{a.max_valid_steps} valid batches; \"updates to Switch's loss\" interpolates them (per seed, against "
        "that seed's Switch run's final validation loss; `–` = not reached).",
        "- Gate settings: `configs/gate/<gate>.yaml` (identical to the Hydra configs). EvoMoE: spawn mode "
        f"`{a.spawn_mode}`, temperature schedule `{a.tau_schedule}` 2.0 -> 0.5, expert-diversify for the first 10% "
        "of the updates, annealing over the next 50%, top-1 from 60% on (fractions of --max-update). "
        f"StableMoE: stage 2 from update {max(1, round(0.1 * a.updates))}.",
        "- Mean experts per token: average over training log intervals (EvoMoE's diversify phase counts 1, "
        "its dense-to-sparse phase up to E); `–` for the dense model (no MoE layer).",
        "",
    ]
    for task in a.tasks:
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        metric, mkey = ("validation perplexity ↓", "ppl") if task == "lm" else ("test BLEU ↑", "bleu")
        lines += [f"## {'Language modelling (WikiText-2)' if task == 'lm' else 'Translation (Multi30k De->En)'}", "",
                  f"| gate | {metric} | final valid loss | updates to Switch's final valid loss | train wall-clock (s) | mean experts / token |",
                  "|---|---|---|---|---|---|"]
        switch = {r["seed"]: r for r in rows if r["gate"] == "switch"}
        for gate in a.gates:
            g = [r for r in rows if r["gate"] == gate]
            if not g:
                continue
            reach = []
            for r in g:
                sw = switch.get(r["seed"])
                if sw and sw["final_valid_loss"] is not None:
                    reach.append(updates_to_reach(r["valid_updates"], r["valid_loss"], sw["final_valid_loss"]))
            reached = [x for x in reach if x is not None]
            reach_s = "n/a (no Switch run)" if not switch else (
                _ms(reached, "{:.0f}") + (f" ({len(reached)}/{len(reach)} seeds)" if len(reached) != len(reach) else ""))
            lines.append(
                f"| {gate} | {_ms([r[mkey] for r in g])} | {_ms([r['final_valid_loss'] for r in g], '{:.3f}')} | {reach_s} | "
                f"{_ms([r['train_wall_s'] for r in g], '{:.0f}')} | {_ms([r['experts_per_token'] for r in g])} |")
        lines += summary_lines(rows, a.gates, mkey, higher_is_better=(task == "mt")) + [""]
        # plots of the first seed of every gate
        first = a.seeds[0]
        runs = {}
        for gate in a.gates:
            p = a.work_dir / task / gate / f"seed{first}" / "train.log"
            if p.is_file():
                runs[gate] = parse_log(p)
        if runs:
            written = make_plots(runs, plot_dir / task)
            lines.append(f"Plots (seed {first}):")
            lines.append("")
            for f in written:
                rel = os.path.relpath(f, res_path.parent)
                lines.append(f"![{Path(f).stem}]({rel})")
            lines.append("")
    lines += [
        "## Reading the numbers",
        "",
        "These are tiny models trained for a few hundred updates on small corpora, so differences between gates",
        "are of the same order as the seed-to-seed spread; look at the ± columns before drawing conclusions.",
        "The paper's claim (EvoMoE reaches Switch's perplexity about 2x faster on GPT-MoE 1.5B / OpenWebText) is",
        "about a far larger scale; the column \"updates to Switch's final valid loss\" is the small-scale",
        "counterpart. Where EvoMoE does not win here, that is reported as measured.",
        "",
        "To run bigger (GPU): see docs/reproduction.md, e.g.",
        "`python scripts/compare_gates.py --gpu --size small --updates 20000 --max-tokens 8192 --seeds 1,2,3`.",
        "",
    ]
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text("\n".join(lines))
    return res_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="lm,mt", help="comma-separated: lm, mt (default: both)")
    p.add_argument("--gates", default=",".join(DEFAULT_GATES), help=f"comma-separated, from {','.join(ALL_GATES)} "
                   f"(default: {','.join(DEFAULT_GATES)})")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--updates", type=int, default=200, help="training updates per run (default 200)")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model size (default tiny)")
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer (default 4)")
    p.add_argument("--max-tokens", type=int, default=1536, help="tokens per update (default 1536)")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="LM block length (default 128)")
    p.add_argument("--lr", type=float, default=0.002, help="peak learning rate (default 0.002)")
    p.add_argument("--balance-wt", type=float, default=0.01, help="balance-loss weight for every gate (default 0.01)")
    p.add_argument("--validations", type=int, default=6, help="validations per run (default 6)")
    p.add_argument("--max-valid-steps", type=int, default=10, help="batches per intermediate validation (default 10)")
    p.add_argument("--spawn-mode", default="mask", choices=["mask", "reinit", "noise", "copy"], help="EvoMoE spawn mode")
    p.add_argument("--tau-schedule", default="linear", choices=["linear", "exponential", "cosine"],
                   help="EvoMoE temperature schedule")
    p.add_argument("--spm-vocab", type=int, default=4000, help="sentencepiece vocabulary of both corpora (default 4000)")
    p.add_argument("--train-lines", type=int, default=0, help="use only the first N training lines/pairs of each "
                   "corpus (smoke tests; default: all)")
    p.add_argument("--eval-lines", type=int, default=200, help="with --train-lines: valid/test lines kept (default 200)")
    p.add_argument("--data-dir", default=None, help="shipped corpora (default: $EVOMOE_DATA or ../shared/data "
                   "when present)")
    p.add_argument("--work-dir", default="runs/compare_gates", help="runs, checkpoints, logs (default runs/compare_gates)")
    p.add_argument("--results", default="docs/results.md", help="Markdown report (default docs/results.md); plots "
                   "go to <results stem>_plots/ next to it")
    p.add_argument("--note", default="", help="a remark printed at the top of the report")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (default 1); on CPU each "
                   "gets cores / jobs threads unless --threads is given, and the per-run wall-clock in the report "
                   "is measured under that sharing")
    p.add_argument("--threads", type=int, default=0, help="torch/OMP threads per run (default: all cores / --jobs)")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (default: CPU)")
    p.add_argument("--force", action="store_true", help="retrain runs that already have a result (the earlier run is "
                   "moved to seed<k>.previous-<time>, not deleted)")
    p.add_argument("--dry-run", action="store_true", help="print the training commands and exit")
    a = p.parse_args(argv)
    a.tasks = [t for t in a.tasks.split(",") if t]
    a.gates = [g for g in a.gates.split(",") if g]
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    for t in a.tasks:
        if t not in TASKS:
            p.error(f"--tasks: unknown task {t!r}; choose from lm, mt")
    for g in a.gates:
        if g not in ALL_GATES:
            p.error(f"--gates: unknown gate {g!r}; choose from {', '.join(ALL_GATES)}")
    if not a.tasks or not a.gates or not a.seeds:
        p.error("--tasks, --gates and --seeds must each name at least one value")
    if a.updates < 10:
        p.error(f"--updates must be at least 10, got {a.updates}")
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.validations < 1 or a.max_valid_steps < 1:
        p.error("--validations and --max-valid-steps must be >= 1")
    # every path absolute now: the subprocesses run in the repository root, not in the caller's folder
    if a.data_dir:
        if not Path(a.data_dir).is_dir():
            p.error(f"--data-dir {a.data_dir} is not a folder (it should hold wikitext-2/ and multi30k/)")
        a.data_dir = Path(a.data_dir).resolve()
    else:
        default = os.environ.get("EVOMOE_DATA") or str(REPO.parent / "shared" / "data")
        a.data_dir = Path(default).resolve() if Path(default).is_dir() else None
    a.work_dir = Path(a.work_dir).resolve()
    a.results = str(Path(a.results).resolve())
    return a


def main(argv=None):
    a = parse_args(argv)
    cmdline = "python scripts/compare_gates.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    a.threads = a.threads or (0 if a.gpu or a.jobs == 1 else max(1, (os.cpu_count() or 1) // a.jobs))
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    jobs = [(t, g, s) for t in a.tasks for g in a.gates for s in a.seeds]
    if a.dry_run:
        for t, g, s in jobs:
            d = a.work_dir / t / g / f"seed{s}"
            print(" ".join(shlex.quote(c) for c in train_command(a, t, g, s, data_dirs(a)[t], d)))
        return 0
    a.work_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(a, env)
    t0 = time.time()
    failed, trained, finished = [], 0, 0
    lock = threading.Lock()

    def job(i, t, g, s):
        nonlocal trained, finished
        t_run = time.time()
        try:
            res = run_one(a, t, g, s, data[t], env, i, len(jobs))
        except RuntimeError as e:
            res = None
            log(f"[{i}/{len(jobs)}] {t} {g} seed {s}: FAILED: {e}")
        with lock:
            finished += 1
            if res is None:
                failed.append(f"{t} {g} seed {s}")
            if time.time() - t_run > 1:  # trained now (not a run finished earlier)
                trained += 1
                done = time.time() - t0
                log(f"    elapsed {done / 60:.1f} min, about {done / trained * (len(jobs) - finished) / 60:.1f} min left")
        return res

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # each job waits on its own subprocess
        results = [r for r in pool.map(lambda j: job(*j), [(i, *tgs) for i, tgs in enumerate(jobs, 1)]) if r is not None]
    report = write_report(a, results, cmdline)
    log(f"report: {report}")
    log(f"runs, logs and checkpoints: {a.work_dir}")
    if failed:
        log(f"failed runs: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
