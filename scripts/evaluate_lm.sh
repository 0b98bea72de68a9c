#!/usr/bin/env bash
# Perplexity of a language model checkpoint on a binarized split with fairseq-eval-lm.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
export PYTHONWARNINGS=ignore

usage() {
  cat <<USAGE
Usage: bash scripts/evaluate_lm.sh --data-bin DIR --checkpoint CKPT [options]

Runs fairseq-eval-lm (the language-model equivalent of evaluate_translation.sh) and reports the
loss and perplexity of the split; MoE layers route top-1 / deterministically at evaluation.

Options:
  --data-bin DIR          binarized data (scripts/prepare_wikitext.sh: OUT/bin)       [required]
  --checkpoint CKPT       language model checkpoint                                  [required]
  --subset NAME           split: test or valid (default: test)
  --tokens-per-sample N   block length (default 512)
  --context-window N      tokens of left context scored without loss (default 0; e.g. N/2 for
                          sliding-window perplexity)
  --max-tokens N          tokens per batch (default 4096)
  --out-dir DIR           where the log and JSON go (default: next to the checkpoint)
  --task NAME             fairseq task (default: the one the checkpoint was trained with, e.g.
                          evomoe_language_modeling for EvoMoE checkpoints)
  --cpu                   run on CPU (default: automatic, CPU when no GPU)
  -h, --help              this message

Writes OUT/eval_lm.<subset>.log and OUT/ppl.<subset>.json ({"loss_base2", "ppl", "tokens"}).
USAGE
}

DATA=""; CKPT=""; SUBSET=test; TPS=512; CTX=0; MAXTOK=4096; OUT=""; CPU=""; TASK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data-bin) need_value "$@"; DATA="$2"; shift 2 ;;
    --checkpoint) need_value "$@"; CKPT="$2"; shift 2 ;;
    --subset) need_value "$@"; SUBSET="$2"; shift 2 ;;
    --tokens-per-sample) need_value "$@"; need_int "$1" "$2"; TPS="$2"; shift 2 ;;
    --context-window) need_value "$@"; need_int "$1" "$2"; CTX="$2"; shift 2 ;;
    --max-tokens) need_value "$@"; need_int "$1" "$2"; MAXTOK="$2"; shift 2 ;;
    --out-dir) need_value "$@"; OUT="$2"; shift 2 ;;
    --task) need_value "$@"; TASK="$2"; shift 2 ;;
    --cpu) CPU=--cpu; shift ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
need_data_and_checkpoint "$DATA" "$CKPT"
[[ -f "$DATA/dict.txt" ]] || die "--data-bin $DATA has no dict.txt (not a binarized language-modelling folder)"
[[ -f "$DATA/$SUBSET.idx" ]] || die "--data-bin $DATA has no '$SUBSET' split ($DATA/$SUBSET.idx); check --subset"
[[ "$CTX" -lt "$TPS" ]] || die "--context-window ($CTX) must be smaller than --tokens-per-sample ($TPS)"
OUT="${OUT:-$(dirname "$CKPT")/eval}"
mkdir -p "$OUT"
if [[ -z "$TASK" ]]; then
  TASK="$("$PY" "$SCRIPTS_DIR/ckpt_info.py" "$CKPT" task._name 2>/dev/null | tail -1)" || die "cannot read the task from --checkpoint $CKPT; pass --task"
fi
[[ -n "$CPU" ]] || "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || CPU=--cpu

LOG="$OUT/eval_lm.$SUBSET.log"
step "fairseq-eval-lm on $SUBSET with $CKPT"
"$(fairseq_tool fairseq-eval-lm)" "$DATA" --user-dir "$USER_DIR" --task "$TASK" --path "$CKPT" --gen-subset "$SUBSET" \
  --tokens-per-sample "$TPS" --context-window "$CTX" --max-tokens "$MAXTOK" $CPU --log-format tqdm 2> >(tee "$LOG" >&2) \
  > "$LOG.stdout" || die "fairseq-eval-lm failed (log: $LOG)"
cat "$LOG.stdout" >> "$LOG"
"$PY" - "$LOG" "$OUT/ppl.$SUBSET.json" <<'PYEOF'
import json, re, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
m = re.findall(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", text)
if not m:
    sys.exit(f"error: no 'Loss (base 2): ..., Perplexity: ...' line in {sys.argv[1]}")
loss, ppl = map(float, m[-1])
t = re.findall(r"Evaluated ([0-9,]+) tokens", text)
res = {"loss_base2": loss, "ppl": ppl, "tokens": int(t[-1].replace(",", "")) if t else None}
json.dump(res, open(sys.argv[2], "w"))
print(f"loss (base 2) = {loss:.4f}, perplexity = {ppl:.2f}")
PYEOF
echo "  details  $LOG"
echo "  result   $OUT/ppl.$SUBSET.json"
