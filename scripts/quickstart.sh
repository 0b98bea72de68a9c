#!/usr/bin/env bash
# The quickstart: prepare shipped WikiText-2, train a tiny EvoMoE GPT on CPU through every phase
# (expert-diversify -> spawn -> dense-to-sparse -> top-1), evaluate it and plot the routing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
export PYTHONWARNINGS=ignore

usage() {
  cat <<USAGE
Usage: bash scripts/quickstart.sh [options]

One command, CPU only, a few minutes on 2 cores (about 10 minutes at most):
  1. WikiText-2 (shipped; first --train-lines lines) -> sentencepiece (4k) -> fairseq binary data
  2. fairseq-train a tiny EvoMoE GPT (2 layers, 64 dims, 4 experts in both layers):
     one dense base expert for the first 10% of the updates, then the spawn of 4 experts,
     the Dense-To-Sparse gate with temperature 2.0 -> 0.5 over the next 50%, top-1 from 60% on
  3. fairseq-eval-lm perplexity on the test split
  4. PNG plots of experts per token, temperature, expert load and validation loss

Options:
  --out-dir DIR       everything goes here (default: runs/quickstart)
  --data-dir DIR      folder holding wikitext-2/ (default: \$EVOMOE_DATA or ../shared/data)
  --updates N         training updates (default 400)
  --train-lines N     WikiText-2 training lines used (default 12000, about one epoch at 400 updates)
  --eval-lines N      valid/test lines used (default 1000)
  --spawn-mode M      EvoMoE spawn mode: mask, reinit, noise, copy (default mask)
  --threads N         CPU threads (default: all cores)
  -h, --help          this message

Running it again is safe: the prepared data is reused only when it was made with the same
--data-dir / --train-lines / --eval-lines (OUT/data/settings.txt), otherwise the old folder is moved
to OUT/data.previous-<time> and the data prepared again; checkpoints of an earlier run are never
deleted: OUT/checkpoints (with its train.log, train.out, eval and plots) is moved to
OUT/checkpoints.previous-<time>.
USAGE
}

OUT=runs/quickstart; DATA_DIR="$(default_data_dir)"; UPDATES=400; TRAIN_LINES=12000; EVAL_LINES=1000; SPAWN=mask; THREADS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out-dir) need_value "$@"; OUT="$2"; shift 2 ;;
    --data-dir) need_value "$@"; DATA_DIR="$2"; shift 2 ;;
    --updates) need_value "$@"; need_int "$1" "$2"; UPDATES="$2"; shift 2 ;;
    --train-lines) need_value "$@"; need_int "$1" "$2"; TRAIN_LINES="$2"; shift 2 ;;
    --eval-lines) need_value "$@"; need_int "$1" "$2"; EVAL_LINES="$2"; shift 2 ;;
    --spawn-mode) need_value "$@"; SPAWN="$2"; shift 2 ;;
    --threads) need_value "$@"; need_int "$1" "$2"; THREADS="$2"; shift 2 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
[[ "$UPDATES" -ge 20 ]] || die "--updates must be at least 20 (the run needs room for every phase), got $UPDATES"
[[ "$SPAWN" =~ ^(mask|reinit|noise|copy)$ ]] || die "--spawn-mode must be mask, reinit, noise or copy, got '$SPAWN'"
[[ -n "$DATA_DIR" ]] || die "no data folder: pass --data-dir (the folder holding wikitext-2/) or set EVOMOE_DATA"
[[ -d "$DATA_DIR" ]] || die "--data-dir (or EVOMOE_DATA) $DATA_DIR is not a folder (it should hold wikitext-2/)"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
[[ -n "$THREADS" ]] && export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
T0=$(date +%s)

# everything that decides the prepared data; the data folder is reused only when it matches
DATA_SETTINGS="data_dir=$DATA_DIR
train_lines=$TRAIN_LINES
eval_lines=$EVAL_LINES
spm_vocab=4000"
step "[1/4] data: WikiText-2 -> $OUT/data"
PREPARE=1
if [[ -f "$OUT/data/bin/train.bin" ]]; then
  if [[ -f "$OUT/data/settings.txt" && "$(cat "$OUT/data/settings.txt")" == "$DATA_SETTINGS" ]]; then
    echo "  already prepared with these settings ($OUT/data/settings.txt)" >&2
    PREPARE=0
  else
    if [[ -f "$OUT/data/settings.txt" ]]; then
      echo "  $OUT/data was prepared with other settings ($(paste -sd' ' "$OUT/data/settings.txt"))" >&2
    else
      echo "  $OUT/data was prepared with unknown settings (no settings.txt)" >&2
    fi
    echo "  -> moved to $(move_aside "$OUT/data"); preparing again with $(paste -sd' ' <<< "$DATA_SETTINGS")" >&2
  fi
fi
if [[ "$PREPARE" == 1 ]]; then
  rm -f "$OUT/data/settings.txt"  # written once the preparation succeeded
  bash "$SCRIPTS_DIR/prepare_wikitext.sh" --data-dir "$DATA_DIR" --out-dir "$OUT/data" --spm-vocab 4000 \
    --train-lines "$TRAIN_LINES" --valid-lines "$EVAL_LINES" --test-lines "$EVAL_LINES" >/dev/null
  printf '%s\n' "$DATA_SETTINGS" > "$OUT/data/settings.txt"
fi

step "[2/4] train a tiny EvoMoE GPT for $UPDATES updates (spawn mode $SPAWN) -> $OUT/checkpoints"
# fairseq-train would resume from (and overwrite) an earlier run's checkpoint: move it aside with its logs
if [[ -d "$OUT/checkpoints" && -n "$(ls -A "$OUT/checkpoints")" ]]; then
  PREV="$(move_aside "$OUT/checkpoints")"
  for f in train.log train.out eval plots; do
    if [[ -e "$OUT/$f" && ! -e "$PREV/$f" ]]; then mv "$OUT/$f" "$PREV/$f"
    elif [[ -e "$OUT/$f" ]]; then move_aside "$OUT/$f" >/dev/null; fi
  done
  echo "  the earlier checkpoints (and their train.log, train.out, eval and plots) were moved to $PREV" >&2
fi
rm -f "$OUT/train.log"  # the log of a run that saved no checkpoint (fairseq appends to --log-file)
"$(fairseq_tool fairseq-train)" "$OUT/data/bin" --user-dir "$USER_DIR" \
  --task evomoe_language_modeling --arch transformer_lm_evomoe_tiny --moe-freq 1 --moe-expert-count 4 \
  --evomoe-spawn-mode "$SPAWN" --share-decoder-input-output-embed \
  --tokens-per-sample 128 --sample-break-mode none --max-tokens 2048 \
  --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-log-expert-load \
  --optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.002 --lr-scheduler inverse_sqrt --warmup-updates $((UPDATES / 10)) \
  --max-update "$UPDATES" --validate-interval-updates $((UPDATES / 5)) --validate-interval 1000000 --max-valid-steps 10 \
  --save-dir "$OUT/checkpoints" --no-epoch-checkpoints --save-interval 1000000 --save-interval-updates "$UPDATES" \
  --keep-interval-updates 1 --seed 1 --cpu --num-workers 0 \
  --log-format json --log-interval 10 --log-file "$OUT/train.log" 2>&1 \
  | tee "$OUT/train.out" | "$PY" "$SCRIPTS_DIR/train_progress.py" --total "$UPDATES"
CKPT="$OUT/checkpoints/checkpoint_last.pt"
[[ -f "$CKPT" ]] || die "training wrote no checkpoint; see $OUT/train.out"

step "[3/4] evaluate: fairseq-eval-lm on the test split"
bash "$SCRIPTS_DIR/evaluate_lm.sh" --data-bin "$OUT/data/bin" --checkpoint "$CKPT" --subset test \
  --tokens-per-sample 128 --out-dir "$OUT/eval" --cpu 2>/dev/null | grep -E "perplexity" >&2 || die "evaluation failed (see $OUT/eval)"

step "[4/4] plots"
"$PY" "$SCRIPTS_DIR/plot_routing.py" --run "EvoMoE ($SPAWN)=$OUT/train.log" --out-dir "$OUT/plots" | sed 's/^/  /'

T1=$(date +%s)
cat <<DONE

Quickstart finished in $(( (T1 - T0) / 60 )) min $(( (T1 - T0) % 60 )) s. Everything is in $OUT:
  data (sentencepiece + binary)   $OUT/data
  training log (JSON)             $OUT/train.log   (full output: $OUT/train.out)
  checkpoint                      $CKPT
  test perplexity                 $OUT/eval/ppl.test.json
  plots                           $OUT/plots/routing.png, expert_load_*.png, validation.png
Next: bash scripts/evaluate_lm.sh --help, python benchmarks/compare_gates.py --help, configs/README.md
DONE
