#!/usr/bin/env bash
# GPU device check: the CUDA tests, the no-host-sync check, EvoMoE through every phase in bf16 and
# fp16, two expert-parallel workers on the one GPU, the layer benchmark and fairseq-train words/s,
# written as they finish to one markdown report. See --help and docs/benchmarks.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/_common.sh"
HELPERS="$REPO_DIR/benchmarks/device_check"

usage() {
  cat <<USAGE
Usage: bash benchmarks/device_check.sh [options]

Runs on one CUDA GPU (made to finish within 8 minutes on an H100; stops at once without a GPU):
  0  binarize the shipped WikiText-2 (scripts/prepare_wikitext.sh), unless the work folder has it
  1  CUDA tests: pytest tests/test_cuda.py and the CUDA case of tests/test_diversify.py
  2  no host synchronisation: tests/test_sync_free.py's CUDA test, a training step of each gate
     (top-1, top-2, hash, StableMoE, DTS hard; capacity 1.25, padded ids) under
     torch.cuda.set_sync_debug_mode("error"), as a table of gate x dtype
  3  EvoMoE (transformer_lm_evomoe_tiny) through phases 0, 1, 2 with fairseq-train, --bf16 and
     --fp16 --fp16-no-flatten-grads; the log must show every phase and finite losses
  4  two expert-parallel workers (torchrun) on the one GPU, the tiny EvoMoE with --bf16, on gloo
     (NCCL refuses two ranks on one device)
  5  benchmarks/bench_moe_layer.py, bf16, E = 8, 16, 64: MoE layer over a dense FFN of equal active FLOPs,
     and the default expert path's speed relative to the batched one
  6  fairseq-train words/s of GPT-small (transformer_lm_moe_gpt_small), 16 experts against
     --moe-freq 0 (dense), bf16, 200 updates each: the MoE / dense ratio

Each section has its own time limit, cut to what is left of --budget; a failed section does not
stop the others, and the script exits 1 at the end if any failed (2 on bad options or no GPU).

Options:
  --out FILE        the report (default runs/device_check/report.md); logs go to the work folder
  --work-dir DIR    logs and binarized data (default: the report's folder/work)
  --data-dir DIR    folder holding wikitext-2/ (default: \$EVOMOE_DATA or ../shared/data); not
                    needed when the work folder already holds wikitext-2/bin (binarize it
                    elsewhere with scripts/prepare_wikitext.sh --out-dir WORK/wikitext-2)
  --budget SECONDS  time for the whole check; a section is skipped (and fails) once less than
                    $MIN_SECTION s are left (default 470)
  --only LIST       run only these sections, e.g. 1,2 or 5,6 (default 1,2,3,4,5,6; the data
                    step runs when 3, 4 or 6 needs it)
  -h, --help        this message
USAGE
}

MIN_SECTION=20
OUT=runs/device_check/report.md; WORK=""; DATA_DIR="$(default_data_dir)"; BUDGET=470; ONLY=1,2,3,4,5,6
ARGV="$*"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --work-dir) need_value "$@"; WORK="$2"; shift 2 ;;
    --data-dir) need_value "$@"; DATA_DIR="$2"; shift 2 ;;
    --budget) need_value "$@"; need_int "$1" "$2"; BUDGET="$2"; shift 2 ;;
    --only) need_value "$@"; [[ "$2" =~ ^[1-6](,[1-6])*$ ]] || die "option --only takes section numbers 1-6 separated by commas, got '$2'"
            ONLY="$2"; shift 2 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

# before anything runs: torch and the GPU, then the other packages every section needs (one Python
# start; its last line is "cuda False" without a GPU, "cuda True" when every package imports)
preflight="$("$PY" - <<'PY' 2>/dev/null
import importlib
def missing(modules):
    found = []
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # an import that fails for any reason counts as missing
            found.append(f"{m} ({type(e).__name__}: {e})")
    return found
lacking = missing(["torch"])
if not lacking and not importlib.import_module("torch").cuda.is_available():
    print("cuda False")  # no GPU: the other packages need not be imported to say so
else:
    lacking = lacking or missing(["fairseq", "fairseq_cli.train", "hydra", "omegaconf", "bitarray", "sacrebleu"])
    print("\n".join(lacking) if lacking else "cuda True")
PY
)" || die "$PY could not be run"
cuda="$(echo "$preflight" | tail -n 1)"
[[ "$cuda" != "cuda False" ]] \
  || die "no CUDA GPU: torch.cuda.is_available() is False with $PY; the device check needs a GPU machine (nothing was run)"
[[ "$cuda" == "cuda True" ]] || die "$PY cannot import: $(echo "$preflight" | paste -sd ';' -); install the project first (README), nothing was run"

mkdir -p "$(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
WORK="${WORK:-$(dirname "$OUT")/work}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
cd "$REPO_DIR"
# every Python process imports this checkout's fairseq_evomoe (a script's own folder comes first on
# its path, so an installed copy elsewhere would otherwise win for benchmarks/*.py)
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

report() { "$PY" "$HELPERS/report.py" "$1" --out "$OUT" "${@:2}"; }
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

FAILED=0
# section TITLE LIMIT KIND LOG COMMAND...: runs COMMAND under `timeout`, its output in LOG, and
# appends the outcome to the report (checks.KINDS[KIND] judges the log); never stops the script.
section() {
  local title=$1 limit=$2 kind=$3 log=$4; shift 4
  local left=$((BUDGET - SECONDS))
  if (( left < MIN_SECTION )); then
    report skip --title "$title" --text "$left s of the --budget of $BUDGET s were left"
    step "$title: skipped (budget)"; FAILED=$((FAILED + 1)); return 0
  fi
  (( limit <= left )) || limit=$left
  step "$title (at most $limit s)"
  local cmd t0 rc=0
  cmd="$(printf '%q ' "$@")"
  report start --title "$title" --limit "$limit" --command "${cmd% }"
  t0=$(date +%s.%N)
  timeout --kill-after 10 "$limit" "$@" >"$log" 2>&1 </dev/null || rc=$?
  report finish --title "$title" --kind "$kind" --log "$log" --rc "$rc" \
    --seconds "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" || FAILED=$((FAILED + 1))
}

report header --argv "$ARGV"
report note --text "Work folder (logs, data): \`$WORK\`. Time budget $BUDGET s."

# fairseq-train as a module of this Python (a --target install has no console script on PATH)
FAIRSEQ_TRAIN=("$PY" -m fairseq_cli.train)
DATA="$WORK/wikitext-2/bin"
if wanted 3 || wanted 4 || wanted 6; then
  if [[ -f "$DATA/train.bin" ]]; then
    report note --text "## 0. Data"$'\n\n'"Reused the binarized WikiText-2 in \`$DATA\`."
  else
    section "0. Data: WikiText-2 binarized" 90 data "$WORK/data.log" \
      bash scripts/prepare_wikitext.sh --data-dir "$DATA_DIR" --out-dir "$WORK/wikitext-2" --workers 8
  fi
fi

if wanted 1; then
  section "1. CUDA tests" 150 pytest "$WORK/cuda_tests.log" \
    "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_cuda.py \
    "tests/test_diversify.py::test_spawn_reaches_the_fp32_master_copies[fairseq_flat]"
fi

if wanted 2; then
  section "2. No host synchronisation in an MoE training step" 60 sync "$WORK/sync_check.log" \
    "$PY" -m pytest -q -rA --durations=0 --durations-min=0 -p no:cacheprovider tests/test_sync_free.py -k never_waits_for_the_gpu
fi

# T_div = 10, temperature 2.0 -> 0.1 over 20 updates, top-1 from update 32; logged every 2 updates
TINY=("$DATA" --user-dir "$USER_DIR" --task evomoe_language_modeling --arch transformer_lm_evomoe_tiny
      --criterion moe_cross_entropy --tokens-per-sample 128 --max-tokens 2048 --optimizer adam --lr 2e-3
      --evomoe-diversify-updates 10 --dts-anneal-updates 20 --dts-hard-update 32 --dts-tau-min 0.1
      --max-update 40 --seed 1 --log-format json --log-interval 2 --num-workers 0 --no-save --disable-validation
      --save-dir "$WORK/no_checkpoints")
if wanted 3; then
  section "3a. EvoMoE through every phase, --bf16" 75 phases "$WORK/evomoe_bf16.log" \
    "${FAIRSEQ_TRAIN[@]}" "${TINY[@]}" --bf16
  section "3b. EvoMoE through every phase, --fp16 --fp16-no-flatten-grads" 75 phases "$WORK/evomoe_fp16.log" \
    "${FAIRSEQ_TRAIN[@]}" "${TINY[@]}" --fp16 --fp16-no-flatten-grads
fi

if wanted 4; then
  BACKEND=gloo  # NCCL refuses two ranks on one device ("Duplicate GPU detected")
  report note --text "The expert-parallel run uses the gloo backend (NCCL refuses two ranks on one device): gloo passes the CUDA tensors through host memory, so this checks correctness, not speed."
  # both workers on cuda:0 (--device-id 0; the entry point would give rank 1 cuda:1)
  section "4. Two expert-parallel workers on one GPU ($BACKEND), EvoMoE --bf16" 100 expert_parallel "$WORK/expert_parallel.log" \
    "$PY" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$(free_port)" \
    -m fairseq_evomoe.distributed.train "${TINY[@]}" --bf16 --distributed-backend "$BACKEND" \
    --ddp-backend legacy_ddp --device-id 0
fi

if wanted 5; then
  section "5. MoE layer over a dense FFN (bench_moe_layer.py, bf16)" 90 bench "$WORK/bench_moe_layer.log" \
    "$PY" benchmarks/bench_moe_layer.py --device cuda --dtype bfloat16 --experts 8 16 64 --tokens 16384 \
    --reps 10 --warmup 2 --compare batched
fi

GPT=("$DATA" --user-dir "$USER_DIR" --task language_modeling --arch transformer_lm_moe_gpt_small
     --criterion moe_cross_entropy --moe-expert-count 16 --moe-gate top1 --moe-capacity-factor 1.0
     --tokens-per-sample 1024 --sample-break-mode none --max-tokens 16384 --bf16
     --optimizer adam --adam-betas "(0.9, 0.98)" --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 50
     --max-update 200 --seed 1 --log-format json --log-interval 25 --num-workers 2 --no-save --disable-validation
     --save-dir "$WORK/no_checkpoints")
if wanted 6; then
  section "6a. fairseq-train words/s, GPT-small dense (--moe-freq 0), bf16" 90 wps "$WORK/gpt_small_dense.log" \
    "${FAIRSEQ_TRAIN[@]}" "${GPT[@]}" --moe-freq 0
  section "6b. fairseq-train words/s, GPT-small MoE (16 experts every second layer), bf16" 120 wps "$WORK/gpt_small_moe.log" \
    "${FAIRSEQ_TRAIN[@]}" "${GPT[@]}"
  report note --text "## 6. Words/s, MoE over dense"$'\n\n'"From the logs of 6a and 6b (median of each run's logged intervals after the first)."
  report finish --title "6. Words/s, MoE over dense" --kind wps_ratio --seconds 0 \
    --log "$WORK/gpt_small_dense.log" --log "$WORK/gpt_small_moe.log" || FAILED=$((FAILED + 1))
fi

report summary && (( FAILED == 0 )) || { step "device check: $FAILED section(s) failed; report: $OUT"; exit 1; }
step "device check passed; report: $OUT"
