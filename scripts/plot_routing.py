#!/usr/bin/env python3
"""Plot routing and validation curves from fairseq JSON training logs (`--log-format json`).

Reads the stdout of fairseq-train / fairseq-hydra-train or a `--log-file`; each run is NAME=PATH
(split at the first '=', so paths may contain '=') or just PATH (the name is then the file's parent
folder; a positional argument that is an existing file is always a plain path). Writes PNGs:

  routing.png            mean experts per token and DTS temperature against updates (all runs),
                         with the EvoMoE phases shaded for the first run that logs them
  expert_load_<run>.png  per-expert share of the routed tokens against updates, one heatmap per
                         MoE layer (needs --moe-log-expert-load in training)
  validation.png         validation loss and perplexity of all runs on one chart

Example:
  python scripts/plot_routing.py --run evomoe=runs/evomoe/train.log --run switch=runs/switch/train.log \
      --out-dir runs/plots
"""

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

PHASES = {0: "diversify", 1: "dense-to-sparse", 2: "top-1"}
LOAD_KEY = re.compile(r"^moe_load_(.+)_e(\d+)$")


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def parse_log(path):
    """Return {"train": [records], "valid": [records], "epoch": [records]} with float values.

    train records are fairseq's train_inner lines (keys as logged, plus "num_updates");
    valid records have the "valid_" prefix stripped; epoch records the "train_" prefix stripped.
    One train and one valid record per update, the last logged: a run resumed from a checkpoint
    logs again, into the same file, the updates its interrupted attempt had logged after it."""
    out = {"train": [], "valid": [], "epoch": []}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            i = line.find("{")
            if i < 0:
                continue
            try:
                rec = json.loads(line[i:])
            except ValueError:
                continue  # e.g. the config dict fairseq prints (Python repr, not JSON)
            if not isinstance(rec, dict):
                continue
            if "valid_loss" in rec or any(k.startswith("valid_") for k in rec):
                r = {k[len("valid_"):]: _num(v) for k, v in rec.items() if k.startswith("valid_")}
                if r.get("num_updates") is not None:
                    out["valid"].append(r)
            elif "train_loss" in rec:
                out["epoch"].append({k[len("train_"):]: _num(v) for k, v in rec.items() if k.startswith("train_")})
            elif "num_updates" in rec and "loss" in rec:
                out["train"].append({k: _num(v) for k, v in rec.items()})
    return dict(out, train=_last_per_update(out["train"]), valid=_last_per_update(out["valid"]))


def _last_per_update(records):
    by_update = {}
    for r in records:
        by_update[r.get("num_updates")] = r
    return sorted(by_update.values(), key=lambda r: (r["num_updates"] is None, r["num_updates"] or 0))


def series(records, key):
    xs, ys = [], []
    for r in records:
        if r.get(key) is not None and r.get("num_updates") is not None:
            xs.append(r["num_updates"])
            ys.append(r[key])
    return xs, ys


def expert_loads(records):
    """{layer: (updates, [[share of expert k at each update] for k])} from moe_load_<layer>_e<k> keys."""
    layers = defaultdict(dict)
    for r in records:
        for k in r:
            m = LOAD_KEY.match(k)
            if m:
                layers[m.group(1)][int(m.group(2))] = True
    result = {}
    for layer, experts in sorted(layers.items()):
        n = max(experts) + 1
        ups, grid = [], [[] for _ in range(n)]
        for r in records:
            if r.get("num_updates") is None or f"moe_load_{layer}_e0" not in r:
                continue
            ups.append(r["num_updates"])
            for e in range(n):
                v = r.get(f"moe_load_{layer}_e{e}")
                grid[e].append(math.nan if v is None else v)
        if ups:
            result[layer] = (ups, grid)
    return result


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10, "figure.dpi": 110})
    return plt


def _phase_spans(records):
    """Contiguous (start, end, phase) spans from the per-interval mean of moe_phase."""
    xs, ys = series(records, "moe_phase")
    spans = []
    for x, y in zip(xs, ys):
        p = int(round(y))
        if spans and spans[-1][2] == p:
            spans[-1][1] = x
        else:
            start = spans[-1][1] if spans else 0
            spans.append([start, x, p])
    return spans


def plot_routing(runs, out):
    plt = _plt()
    has_temp = any(series(log["train"], "moe_temperature")[0] for log in runs.values())
    fig, axes = plt.subplots(2 if has_temp else 1, 1, figsize=(11.5, 6.5 if has_temp else 4), sharex=True, squeeze=False)
    axes = axes[:, 0]
    shaded = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    phase_colors = {0: "#dddddd", 1: "#fde9c9", 2: "#d6ecd2"}
    for i, (name, log) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        # EvoMoE's phases: only runs with a DTS temperature (other gates log their own stages, e.g. StableMoE's)
        is_dts = bool(series(log["train"], "moe_temperature")[0])
        spans = _phase_spans(log["train"]) if is_dts else []
        if not shaded and len({s[2] for s in spans}) > 1:
            for ax in axes:
                for a, b, p in spans:
                    ax.axvspan(a, b, color=phase_colors.get(p, "#eeeeee"), alpha=0.6, lw=0,
                               label=f"{name} phase: {PHASES.get(p, p)}" if ax is axes[0] else None)
            shaded = True
        xs, ys = series(log["train"], "moe_experts_per_token")
        if xs:
            axes[0].plot(xs, ys, color=c, lw=1.8, label=name)
        if has_temp:
            xs, ys = series(log["train"], "moe_temperature")
            if xs:
                axes[1].plot(xs, ys, color=c, lw=1.8, label=name)
    axes[0].set_ylabel("mean experts per token")
    axes[0].set_title("Routing during training (train_inner logs)")
    axes[0].set_ylim(bottom=0)
    axes[0].grid(alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if has_temp:
        axes[1].set_ylabel("DTS temperature τ")
        axes[1].grid(alpha=0.3)
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axes[-1].set_xlabel("updates")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_expert_load(name, log, out):
    loads = expert_loads(log["train"])
    if not loads:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(loads), 1, figsize=(9, 1.2 + 1.6 * len(loads)), squeeze=False, sharex=True)
    im = None
    for ax, (layer, (ups, grid)) in zip(axes[:, 0], loads.items()):
        n = len(grid)
        edges = list(ups)
        step = (ups[1] - ups[0]) if len(ups) > 1 else 1
        x_edges = [ups[0] - step] + edges
        im = ax.pcolormesh(x_edges, range(n + 1), grid, cmap="viridis", vmin=0, vmax=min(1.0, max(3.0 / n, 0.5)), shading="flat")
        ax.set_yticks([e + 0.5 for e in range(n)])
        ax.set_yticklabels([f"e{e}" for e in range(n)])
        ax.set_ylabel(f"layer {layer}")
    axes[0, 0].set_title(f"{name}: share of routed tokens per expert (uniform = {1 / n:.2f})")
    axes[-1, 0].set_xlabel("updates")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of tokens", fraction=0.04, pad=0.02)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_validation(runs, out):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_valid = False
    for i, (name, log) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        # MoE criteria log the task loss as inner_loss (loss = task + balance loss)
        key = "inner_loss" if series(log["valid"], "inner_loss")[0] else "loss"
        xs, ys = series(log["valid"], key)
        if xs:
            any_valid = True
            axes[0].plot(xs, ys, "o-", color=c, lw=1.8, ms=4, label=name)
            axes[1].plot(xs, [2 ** y for y in ys], "o-", color=c, lw=1.8, ms=4, label=name)
        xt, yt = series(log["train"], "inner_loss" if series(log["train"], "inner_loss")[0] else "loss")
        if xt:
            axes[0].plot(xt, yt, "--", color=c, lw=1, alpha=0.5)
    axes[0].set_ylabel("loss (base 2; dashed = training)")
    axes[0].set_title("Validation loss")
    axes[1].set_ylabel("perplexity (log scale)")
    axes[1].set_yscale("log")
    axes[1].set_title("Validation perplexity")
    for ax in axes:
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3, which="both")
        if any_valid:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out if any_valid else None


def make_plots(runs, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_routing(runs, out_dir / "routing.png")]
    for name, log in runs.items():
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        written.append(plot_expert_load(name, log, out_dir / f"expert_load_{safe}.png"))
    written.append(plot_validation(runs, out_dir / "validation.png"))
    return [p for p in written if p]


def parse_spec(spec, positional=False):
    """(name, path) of a run given as NAME=PATH or PATH. NAME=PATH splits at the first '=', so the path
    may contain '=' (runs/lr=0.002/train.log); a spec that is itself an existing file is a plain path
    (always for positional arguments; for --run when NAME=PATH does not name a file). name is "" for a
    plain path."""
    name, eq, path = spec.partition("=")
    if not eq or (Path(spec).is_file() and (positional or not Path(path).is_file())):
        return "", Path(spec)
    return name, Path(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="NAME=LOG", help="a run's JSON log (repeatable); "
                   "NAME is everything before the first '=' (the path may contain '='); a bare LOG is named after its folder")
    p.add_argument("logs", nargs="*", help="more logs (LOG or NAME=LOG); named after their folder")
    p.add_argument("--out-dir", required=True, help="where the PNGs go")
    a = p.parse_args(argv)
    specs = [("--run", s) for s in a.run] + [("log", s) for s in a.logs]
    if not specs:
        p.error("give at least one log with --run NAME=LOG or as a positional argument")
    runs = {}
    for kind, spec in specs:
        name, path = parse_spec(spec, positional=(kind == "log"))
        if not path.is_file():
            p.error(f"{kind} {spec}: log file {path} does not exist")
        name = name or path.parent.name or path.stem
        if name in runs:
            p.error(f"{kind} {spec}: a run is already named {name!r} (name each one: --run NAME=LOG)")
        log = parse_log(path)
        if not log["train"] and not log["valid"]:
            p.error(f"{kind} {spec}: no JSON training records in {path} (train with --log-format json)")
        runs[name] = log
        print(f"{name}: {len(log['train'])} training and {len(log['valid'])} validation records from {path}")
    for f in make_plots(runs, a.out_dir):
        print(f"wrote {f}")


if __name__ == "__main__":
    sys.exit(main())
