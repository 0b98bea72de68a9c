#!/usr/bin/env bash
# Runs behind docs/sparsity.md: DTS gate, --dts-sparsity scheduled vs threshold (the paper's rule),
# tiny 4-layer GPT on WikiText-2, CPU. Raw JSON logs go to LOG_DIR (default /tmp/sparsity_logs);
# the tables of docs/sparsity.md are printed at the end (also: bash benchmarks/sparsity_runs.sh --tables).
# The DTS settings are those of the page's runs (2026-11-30): the hard phase samples argmax(l + g) and
# the balance loss applies in the soft phase too, as the defaults were then.
#
#   (with fairseq-train on PATH, e.g. . .venv/bin/activate)
#   bash scripts/prepare_wikitext.sh --out-dir /tmp/wt2     # once: -> /tmp/wt2/bin
#   bash benchmarks/sparsity_runs.sh                           # 7 runs, 2 at a time, 1 thread each
set -euo pipefail

DATA=${DATA:-/tmp/wt2/bin}
LOG_DIR=${LOG_DIR:-/tmp/sparsity_logs}
PARALLEL=${PARALLEL:-2}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$(dirname "$0")/.."
mkdir -p "$LOG_DIR"

# run NAME SPARSITY E MAX_UPDATE T_DIV D H
run() {
    local name=$1 sparsity=$2 e=$3 max_update=$4 t_div=$5 d=$6 h=$7
    fairseq-train "$DATA" --user-dir fairseq_evomoe \
        --task evomoe_language_modeling --arch transformer_lm_evomoe_tiny \
        --decoder-layers 4 --decoder-embed-dim 128 --decoder-ffn-embed-dim 512 --decoder-attention-heads 4 \
        --moe-freq 2 --moe-expert-count "$e" \
        --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 \
        --tokens-per-sample 128 --sample-break-mode none --max-tokens 2048 \
        --optimizer adam --adam-betas '(0.9, 0.98)' --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 50 \
        --max-update "$max_update" --evomoe-diversify-updates "$t_div" --dts-anneal-updates "$d" --dts-hard-update "$h" \
        --dts-sparsity "$sparsity" --dts-hard-routing sample --moe-soft-gate-loss-wt -1 \
        --seed 1 --cpu --num-workers 0 --log-format json --log-interval 1 --disable-validation --no-save \
        > "$LOG_DIR/$name.log" 2>&1 && echo "done: $name" || echo "FAILED: $name (see $LOG_DIR/$name.log)"
}

# name sparsity E max_update T_div D H; longest first. E = 64 is cut to 150 updates (same proportions).
RUNS=(
    "threshold_E16 threshold 16 300 30 150 180"
    "scheduled_E16 scheduled 16 300 30 150 180"
    "threshold_E8 threshold 8 300 30 150 180"
    "threshold_E4 threshold 4 300 30 150 180"
    "scheduled_E8 scheduled 8 300 30 150 180"
    "scheduled_E4 scheduled 4 300 30 150 180"
    "scheduled_E64 scheduled 64 150 15 75 90"
)

if [[ "${1:-}" != "--tables" ]]; then
    for spec in "${RUNS[@]}"; do
        while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n || true; done
        run $spec &
    done
    wait
fi

LOG_DIR="$LOG_DIR" python3 - "${RUNS[@]}" <<'EOF'
import json, os, statistics, sys

log_dir = os.environ["LOG_DIR"]
def lines(name):
    out = {}
    for l in open(os.path.join(log_dir, name + ".log")):
        if "| train_inner |" in l:
            d = json.loads(l.split("| train_inner |", 1)[1])
            out[int(d["num_updates"])] = {k: (float(v) if k != "epoch" else v) for k, v in d.items()}
    return out

f = lambda x, n=2: f"{x:.{n}f}"
rows = {"scheduled": [], "threshold": []}
for spec in sys.argv[1:]:
    name, mode, e, max_update, t_div, d, h = spec.split()
    e, max_update, t_div, d, h = map(int, (e, max_update, t_div, d, h))
    L = lines(name)
    if max(L) < max_update:
        print(f"{name}: incomplete ({max(L)} of {max_update} updates)", file=sys.stderr)
        continue
    # the line logged at num_updates = n covers the update whose forward ran at n - 1
    first_soft, mid, before, first_hard = t_div + 1, t_div + d // 2 + 1, h, h + 1
    ept = lambda n: L[n]["moe_experts_per_token"]
    loss_key = "inner_loss"
    pre = [L[n][loss_key] for n in range(h - 4, h + 1)]
    post = [L[n][loss_key] for n in range(h + 1, h + 6)]
    spread_from = h - (h - t_div) // 5  # 150 for the 300-update runs (30 lines before the switch)
    diffs = [L[n][loss_key] - L[n - 1][loss_key] for n in range(spread_from + 1, h + 1)]
    r = dict(name=name, E=e, max_update=max_update, lines=(first_soft, mid, before, first_hard),
             ept=(ept(first_soft), ept(mid), ept(before), ept(first_hard)),
             temp=(L[first_soft]["moe_temperature"], L[mid]["moe_temperature"], L[before]["moe_temperature"]),
             changed=L[first_hard].get("moe_switch_changed_pct", float("nan")),
             pre=statistics.mean(pre), post=statistics.mean(post), jump=statistics.mean(post) - statistics.mean(pre),
             spread=statistics.stdev(diffs), trend=statistics.mean(diffs), spread_range=(spread_from, h),
             compute=L[max(L)]["moe_expert_compute"], phases=sorted({int(v["moe_phase"]) for v in L.values()}))
    if mode == "scheduled":
        soft = [v for v in L.values() if int(v["moe_phase"]) == 1]
        devs = [abs(v["moe_experts_per_token"] - v["moe_target_experts_per_token"]) / v["moe_target_experts_per_token"] for v in soft]
        r["target"] = tuple(L[n]["moe_target_experts_per_token"] for n in (first_soft, mid, before, first_hard))
        r["maxdev"], r["nsoft"] = max(devs), len(soft)
        r["outside"] = sum(dv > 0.10 for dv in devs)
    rows[mode].append(r)

for mode in ("scheduled", "threshold"):
    rs = sorted(rows[mode], key=lambda r: r["E"])
    if not rs:
        continue
    print(f"\n### {mode}\n")
    if mode == "scheduled":
        print("| E | updates | ept (k) first soft | ept (k) mid-anneal | ept (k) before switch | ept after switch | max rel. dev. (soft lines) | lines > 10% |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rs:
            c = [f"{f(r['ept'][i])} ({f(r['target'][i])}) @{r['lines'][i]}" for i in range(3)]
            print(f"| {r['E']} | {r['max_update']} | " + " | ".join(c) + f" | {f(r['ept'][3])} @{r['lines'][3]} | {r['maxdev']:.2e} ({r['nsoft']} lines) | {r['outside']} |")
    else:
        print("| E | updates | ept first soft (tau) | ept mid-anneal (tau) | ept before switch (tau) | ept/E before switch | ept after switch |")
        print("|---|---|---|---|---|---|---|")
        for r in rs:
            c = [f"{f(r['ept'][i])} ({f(r['temp'][i])}) @{r['lines'][i]}" for i in range(3)]
            print(f"| {r['E']} | {r['max_update']} | " + " | ".join(c) + f" | {r['ept'][2] / r['E']:.0%} | {f(r['ept'][3])} @{r['lines'][3]} |")
    print("\n| E | switch changed % (first hard line) | inner_loss, mean of 5 before | mean of 5 after | after - before | std of step-to-step diffs (updates) | mean step-to-step diff | expert compute at end |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rs:
        a, b = r["spread_range"]
        print(f"| {r['E']} | {f(r['changed'])} | {f(r['pre'], 3)} | {f(r['post'], 3)} | {r['jump']:+.3f} | {f(r['spread'], 3)} ({a}-{b}) | {r['trend']:+.3f} | {r['compute']:.4g} |")
EOF
