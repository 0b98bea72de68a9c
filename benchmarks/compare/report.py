"""The comparison's Markdown report: the setting, per task a table of every gate (mean ± std over
seeds), a plain-language ranking with EvoMoE against Switch, and routing / validation plots of the
first seed (written by plot_routing.make_plots to <results stem>_plots/<task>/)."""

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from plot_routing import _plt, make_plots, parse_log

from . import REPO
from .efficiency import per_seed_costs, verdict
from .flags import SIZES, stablemoe_stage2_update, validation_interval, warmup_updates
from .run_store import run_dir
from .switch_effect import LINES, hard_update, switch_effect, switching_like_evomoe


def mean_std(values: list, fmt: str = "{:.2f}") -> str:
    """"mean ± std" of the values that are not None; the value alone for one, "–" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def summary_lines(rows: List[dict], gates: List[str], mkey: str, higher_is_better: bool) -> List[str]:
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
    for evo in [g for g in gates if g.startswith("evomoe") and g in means]:
        if "switch" not in means:
            break
        (e, es, n), (w, ws, _) = means[evo], means["switch"]
        better = (e > w) if higher_is_better else (e < w)
        spread = max(es, ws)
        reading = "within the seed-to-seed spread" if abs(e - w) <= spread else ("better" if better else "worse")
        out.append(
            f"{evo} vs Switch: {e:.2f} vs {w:.2f} ({'better' if better else 'worse'} by {abs(e - w):.2f}; "
            f"largest seed std {spread:.2f}: {reading}), over {n} seed(s)."
        )
    return out


def repo_relative(path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def sharing_text(results: Sequence[dict]) -> str:
    """How the reported runs shared the machine while their train wall-clock was measured, as each
    run recorded it (the invocation that trained it: runs at a time, threads each)."""
    seen: Dict[str, int] = {}
    for r in results:
        s = r.get("wall_sharing")
        key = "not recorded" if s is None else (
            f"{s['jobs']} run(s) at a time" + (f", {s['threads']} thread(s) each" if s["threads"] else ""))
        seen[key] = seen.get(key, 0) + 1
    parts = [f"{k} ({n} run{'s' if n != 1 else ''})" if len(seen) > 1 else k for k, n in seen.items()]
    return "; ".join(parts) if parts else "no run"


def setting_lines(a: argparse.Namespace, cmdline: str, results: Sequence[dict] = ()) -> List[str]:
    """The report's title, command and "Setting" section: what was trained, on what, and how."""
    lines = [
        "# Gate comparison: EvoMoE vs. the baselines (small scale, real data)",
        "",
        f"Written by `benchmarks/compare_gates.py` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"Command: `{cmdline}`",
        "",
    ]
    if a.note:
        lines += [f"> **Note:** {a.note}", ""]
    return lines + [
        "## Setting",
        "",
        f"- Model size `{a.size}` {SIZES[a.size]} (layers per stack, dim, FFN, heads), {a.experts} experts in every "
        f"other FFN (`--moe-freq 2`), balance-loss weight {a.balance_wt}, Adam (0.9, 0.98), lr {a.lr} inverse_sqrt "
        f"with {warmup_updates(a.updates)} warm-up updates, {a.max_tokens} tokens per update, {a.updates} updates, "
        f"seeds {', '.join(map(str, a.seeds))}, {'GPU' if a.gpu else 'CPU'}. Train wall-clock is measured under the "
        f"sharing each run was trained with: {sharing_text(results)} (other processes on the machine not counted).",
        f"- Data: {'the first %d training lines/pairs and %d valid/test lines of each corpus' % (a.train_lines, a.eval_lines) if a.train_lines else 'the full corpora'}"
        f"; sentencepiece (unigram, {a.spm_vocab} pieces).",
        f"- LM: WikiText-2, blocks of {a.tokens_per_sample} tokens; perplexity is per subword on the valid split "
        "(fairseq-eval-lm, top-1 routing at evaluation).",
        "- MT: Multi30k De->En, joint vocabulary; BLEU on test_2016_flickr, beam 5 (hypotheses "
        "at most 1.5 x source + 10 subwords), detokenised sacrebleu.",
        f"- Intermediate validations every {validation_interval(a)} updates on the first "
        f"{a.max_valid_steps} valid batches; \"updates to Switch's loss\" interpolates them (per seed, against "
        "that seed's Switch run's final validation loss; `–` = not reached). \"x Switch's updates\" divides that "
        "by Switch's updates; \"expert compute there\" is the run's cumulative `moe_expert_compute` (kept "
        "token-expert assignments over all MoE layers) at that update, over the Switch run's total.",
        "- Gate settings: `configs/gate/<gate>.yaml` (identical to the Hydra configs)"
        f"{f', or `<gate>.yaml` in `{repo_relative(a.gate_dir)}` for the gates there' if getattr(a, 'gate_dir', None) else ''}. "
        f"EvoMoE (`gate=evomoe`): spawn mode `{a.spawn_mode or 'mask'}`, temperature schedule "
        f"`{a.tau_schedule or 'linear'}` 2.0 -> 0.5, expert-diversify for the first 10% "
        "of the updates, annealing over the next 50%, top-1 from 60% on (fractions of --max-update). "
        f"StableMoE: stage 2 from update {stablemoe_stage2_update(a.updates)}.",
        "- Mean experts per token: average over training log intervals (EvoMoE's diversify phase counts 1, "
        "its dense-to-sparse phase up to E); `–` for the dense model (no MoE layer).",
        "",
    ]


def cost_cells(rows: List[dict], gate: str) -> List[str]:
    """The cells of one gate for reaching Switch's final valid loss (each seed against that seed's
    Switch run): the update, that as a multiple of Switch's updates, and the expert compute spent by
    then as a multiple of Switch's total."""
    if not any(r["gate"] == "switch" for r in rows):
        return ["n/a (no Switch run)", "–", "–"]
    costs = per_seed_costs(rows, gate)
    reached = [c for c in costs if c is not None]
    note = f" ({len(reached)}/{len(costs)} seeds)" if len(reached) != len(costs) else ""
    return [mean_std([c["at"] for c in reached], "{:.0f}") + note,
            mean_std([c["updates"] for c in reached]) + (note if reached else ""),
            mean_std([c["compute"] for c in reached])]


def compute_cell(g: List[dict]) -> str:
    """Total expert compute of the runs (token-expert assignments, millions)."""
    totals = [r["train_curve"]["moe_expert_compute"][-1] / 1e6 for r in g
              if (r.get("train_curve") or {}).get("moe_expert_compute")]
    return mean_std(totals)


def switch_lines(a: argparse.Namespace, rows: List[dict]) -> List[str]:
    """Around EvoMoE's switch to top-1: per seed, the training loss change across it beside what the
    trend before it gives, its normal line-to-line spread, the same change minus Switch's over the
    same lines (same seed, so the same batches), and the tokens it reroutes; Switch for reference."""
    hard = hard_update(a.updates)
    spread_from = hard - a.updates // 5

    def effects_of(gate):
        runs = sorted((r for r in rows if r["gate"] == gate and r.get("train_curve")), key=lambda r: r["seed"])
        return [(r["seed"], switch_effect(r["train_curve"], hard, spread_from)) for r in runs]

    shown = {gate: effects_of(gate) for gate in switching_like_evomoe(a.gates, a.updates, getattr(a, "gate_dir", None)) + ["switch"]}
    switch = dict(shown["switch"])
    table = []
    for gate, effects in shown.items():
        if not any(e for _, e in effects) or (gate == "switch" and not table):
            continue

        def cells(key, fmt):
            return " / ".join("–" if e is None or e[key] is None else fmt.format(e[key]) for _, e in effects)

        paired = " / ".join("–" if e is None or not switch.get(s) or gate == "switch"
                            else f"{e['change'] - switch[s]['change']:+.3f}" for s, e in effects)
        table.append(f"| {gate}{' (no switch; reference)' if gate == 'switch' else ''} | "
                     f"{' / '.join(str(s) for s, _ in effects)} | {cells('change', '{:+.3f}')} | "
                     f"{cells('trend', '{:+.3f}')} | {cells('spread', '{:.3f}')} | {paired} | {cells('rerouted', '{:.1f}')} |")
    if not table:
        return []
    return ["", f"Around the switch to top-1 at update {hard}: the training task loss, mean of the {LINES} log lines "
            f"after minus the {LINES} before; beside it, over updates {spread_from}-{hard}, what the trend alone gives "
            f"({LINES} x the mean line-to-line change) and the standard deviation of the line-to-line change; the change "
            "minus Switch's over the same lines (the same seed trains on the same batches); and the tokens whose "
            "routing the switch changes (first top-1 line; for a hard phase routed by argmax(l), runs made with "
            "code up to 83e5f2e count only the tokens the soft rule gave more than one expert, not those it gave one other "
            "expert).", "",
            "| gate | seeds | loss change across the switch | from the trend before it | line-to-line std before it "
            "| minus Switch's change | tokens rerouted (%) |",
            "|---|---|---|---|---|---|---|", *table]


def wall_cell(runs: List[dict]) -> str:
    """Mean ± std of the runs' training time; * when a resumed run counts only its last attempt."""
    resumed = any(r.get("resumed_from_update") is not None for r in runs)
    return mean_std([r["train_wall_s"] for r in runs], "{:.0f}") + ("*" if resumed else "")


def table_lines(a: argparse.Namespace, task: str, rows: List[dict]) -> List[str]:
    """One task's section: heading, the table of every gate with results, and the summary."""
    metric, mkey = ("validation perplexity ↓", "ppl") if task == "lm" else ("test BLEU ↑", "bleu")
    lines = [f"## {'Language modelling (WikiText-2)' if task == 'lm' else 'Translation (Multi30k De->En)'}", "",
             f"| gate | {metric} | final valid loss | updates to Switch's final valid loss | the same, x Switch's "
             "updates | expert compute there, x Switch's total | expert compute, whole run (M) | train wall-clock (s) "
             "| mean experts / token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for gate in a.gates:
        g = [r for r in rows if r["gate"] == gate]
        if not g:
            continue
        lines.append(
            f"| {gate} | {mean_std([r[mkey] for r in g])} | {mean_std([r['final_valid_loss'] for r in g], '{:.3f}')} | "
            f"{' | '.join(cost_cells(rows, gate))} | {compute_cell(g)} | "
            f"{wall_cell(g)} | {mean_std([r['experts_per_token'] for r in g])} |")
    if any(r.get("resumed_from_update") is not None for r in rows):
        lines += ["", "Train wall-clock marked * includes only the attempt that finished a resumed run."]
    lines += summary_lines(rows, a.gates, mkey, higher_is_better=(task == "mt"))
    verdicts = [v for v in (verdict(rows, g) for g in a.gates if g.startswith("evomoe")) if v]
    return lines + ([""] + [f"- {v}" for v in verdicts] if verdicts else []) + switch_lines(a, rows) + [""]


def plot_lines(a: argparse.Namespace, task: str, rows: List[dict], plot_dir: Path, res_path: Path) -> List[str]:
    """Plots of the first seed of every gate whose run of that seed is in the report (finished with these
    settings), as image links relative to the report."""
    first = a.seeds[0]
    reported = {r["gate"] for r in rows if r["seed"] == first}
    runs = {}
    for gate in a.gates:
        p = run_dir(a, task, gate, first) / "train.log"
        if gate in reported and p.is_file():
            runs[gate] = parse_log(p)
    if not runs:
        return []
    lines = [f"Plots (seed {first}):", ""]
    files = list(make_plots(runs, plot_dir / task))
    switching = switching_like_evomoe(a.gates, a.updates, getattr(a, "gate_dir", None))
    around = plot_around_switch(rows, switching + ["switch"], a.updates, plot_dir / task / "around_switch.png")
    for f in files + ([around] if around else []):
        lines.append(f"![{Path(f).stem}]({os.path.relpath(f, res_path.parent)})")
    return lines + [""]


def plot_around_switch(rows: List[dict], gates: List[str], updates: int, out: Path) -> Optional[Path]:
    """Training loss (the task loss alone, every seed) and experts per token of the EvoMoE gates
    around their hard switch at 60% of the updates, with Switch's loss for reference."""
    hard = hard_update(updates)
    lo, hi = hard - updates // 10, hard + updates // 10
    shown = [g for g in gates if g.startswith("evomoe") or g == "switch"]
    if not any(r["gate"].startswith("evomoe") and r.get("train_curve") for r in rows):
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(11.5, 6.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, gate in enumerate(shown):
        for j, r in enumerate(sorted((r for r in rows if r["gate"] == gate), key=lambda r: r["seed"])):
            c = r.get("train_curve") or {}
            pts = [(x, y, k) for x, y, k in zip(c.get("updates", []), c.get("inner_loss", []),
                                                  c.get("moe_experts_per_token", [None] * len(c.get("updates", []))))
                   if lo <= x <= hi and y is not None]
            if not pts:
                continue
            label = gate if j == 0 else None
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], color=colors[i % len(colors)], lw=1.2, alpha=0.8, label=label)
            ks = [(p[0], p[2]) for p in pts if p[2] is not None]
            axes[1].plot([k[0] for k in ks], [k[1] for k in ks], color=colors[i % len(colors)], lw=1.2, alpha=0.8, label=label)
    for ax in axes:
        ax.axvline(hard, color="k", ls="--", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axes[0].set_ylabel("training loss (task)")
    axes[0].set_title(f"Around the switch to top-1 at update {hard} (every seed)")
    axes[1].set_ylabel("experts per token")
    axes[1].set_xlabel("updates")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


CLOSING = [
    "## Reading the numbers",
    "",
    "These are tiny models trained for a few hundred updates on small corpora, so differences between gates",
    "are of the same order as the seed-to-seed spread; look at the ± columns before drawing conclusions.",
    "The paper's claim (EvoMoE reaches Switch's perplexity about 2x faster on GPT-MoE 1.5B / OpenWebText) is",
    "about a far larger scale; the column \"updates to Switch's final valid loss\" is the small-scale",
    "counterpart. Where EvoMoE does not win here, that is reported as measured.",
    "",
    "To run bigger (GPU): see docs/reproduction.md, e.g.",
    "`python benchmarks/compare_gates.py --gpu --size small --updates 20000 --max-tokens 8192 --seeds 1,2,3`.",
    "",
]


def write_report(a: argparse.Namespace, results: List[dict], cmdline: str, missing: Sequence[str] = ()) -> Path:
    """Write the report to --results (plots to <results stem>_plots/ next to it); returns its path.
    `missing` names the runs the comparison has not finished yet (--report-only)."""
    res_path = Path(a.results)
    plot_dir = res_path.parent / (res_path.stem + "_plots")
    lines = setting_lines(a, cmdline, results)
    if missing:
        lines += [f"> **Partial:** {len(missing)} of the comparison's runs have not finished yet and are not in the "
                  f"tables: {', '.join(missing)}. Their gates' means are over the seeds that finished.", ""]
    for task in a.tasks:
        rows = [r for r in results if r["task"] == task]
        if rows:
            lines += table_lines(a, task, rows) + plot_lines(a, task, rows, plot_dir, res_path)
    lines += CLOSING
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text("\n".join(lines))
    return res_path
