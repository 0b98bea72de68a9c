#!/usr/bin/env bash
# Fine-tune a pre-trained RoBERTa(-MoE) checkpoint on one GLUE task and print its dev metric.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<USAGE
Usage: bash scripts/finetune_glue.sh TASK CHECKPOINT [options] [-- fairseq-train options]

Fine-tunes CHECKPOINT (a roberta_moe* / roberta_evomoe* / roberta model) on TASK with fairseq's
RoBERTa GLUE recipe (examples/roberta/README.glue.md: Adam (0.9, 0.98), eps 1e-6, weight decay 0.1,
polynomial decay, dropout 0.1, 10 epochs' worth of updates; per task:

  task    lr     batch  updates  warm-up  classes
  MNLI    1e-5   32     123873   7432     3
  QNLI    1e-5   32     33112    1986     2
  QQP     1e-5   32     113272   28318    2
  RTE     2e-5   16     2036     122      2
  SST-2   1e-5   32     20935    1256     2
  MRPC    1e-5   16     2296     137      2
  CoLA    1e-5   16     5336     320      2
  STS-B   2e-5   16     3598     214      1 (regression)

with the criterion moe_sentence_prediction (the balance loss added, routing logged), then prints
the task's metric on the dev split (scripts/glue_eval.py): Matthews correlation (CoLA), F1 and
accuracy (MRPC, QQP), Pearson and Spearman (STS-B), accuracy (the others).

The model is rebuilt with the options it was pre-trained with (read from the checkpoint), and its
MoE layers keep the routing they reached: an EvoMoE model that reached top-1 fine-tunes top-1.

Options:
  --data DIR         the task's binarized data (default: data-bin/glue/<TASK>-bin, from prepare_glue.sh)
  --save-dir DIR     checkpoints (default: checkpoints/glue/<TASK>)
  --lr LR / --batch-size N / --updates N / --warmup N
                     override the table above (--updates sets --total-num-update and --max-update)
  --cpu              train on the CPU (default: the GPU, in fp16, when there is one)
  -h, --help         this message
Everything after -- goes to fairseq-train last, so it overrides any option above.

Output: SAVE/checkpoint_best.pt (by dev accuracy; STS-B: dev loss), SAVE/train.log, SAVE/dev_metrics.json.
An earlier fine-tune in SAVE is moved to SAVE.previous-<time>, never overwritten.
USAGE
}

[[ $# -ge 1 && ( "$1" == -h || "$1" == --help ) ]] && { usage; exit 0; }
[[ $# -ge 2 ]] || { usage >&2; die "TASK and CHECKPOINT are required"; }
TASK="$1"; CKPT="$2"; shift 2
DATA=""; SAVE=""; LR=""; BSZ=""; UPDATES=""; WARMUP=""; CPU=0; EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data) need_value "$@"; DATA="$2"; shift 2 ;;
    --save-dir) need_value "$@"; SAVE="$2"; shift 2 ;;
    --lr) need_value "$@"; LR="$2"; shift 2 ;;
    --batch-size) need_value "$@"; need_int "$1" "$2"; BSZ="$2"; shift 2 ;;
    --updates) need_value "$@"; need_int "$1" "$2"; UPDATES="$2"; shift 2 ;;
    --warmup) need_value "$@"; need_int "$1" "$2"; WARMUP="$2"; shift 2 ;;
    --cpu) CPU=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option '$1' (fairseq-train options go after --)" ;;
  esac
done
glue_task_info "$TASK"  # NUM_CLASSES, METRIC, PAIR (or a clear error)
[[ -f "$CKPT" ]] || die "CHECKPOINT $CKPT does not exist"
DATA="${DATA:-data-bin/glue/$TASK-bin}"
[[ -f "$DATA/input0/dict.txt" ]] || die "--data $DATA has no input0/dict.txt (prepare it with scripts/prepare_glue.sh --task $TASK)"
SAVE="${SAVE:-checkpoints/glue/$TASK}"
# the earlier fine-tune in SAVE is moved aside below: the checkpoint must not be inside it
ckpt_real="$(realpath -m "$CKPT")"; save_real="$(realpath -m "$SAVE")"
[[ "$ckpt_real" != "$save_real"/* ]] \
  || die "CHECKPOINT $CKPT is inside --save-dir $SAVE, which is moved aside before fine-tuning (so fairseq would train from scratch); give another --save-dir, or copy the checkpoint out of $SAVE first"

case "$TASK" in  # lr batch updates warm-up
  MNLI) T=(1e-5 32 123873 7432) ;;  QNLI) T=(1e-5 32 33112 1986) ;;  QQP) T=(1e-5 32 113272 28318) ;;
  RTE) T=(2e-5 16 2036 122) ;;      SST-2) T=(1e-5 32 20935 1256) ;; MRPC) T=(1e-5 16 2296 137) ;;
  CoLA) T=(1e-5 16 5336 320) ;;     STS-B) T=(2e-5 16 3598 214) ;;
esac
LR="${LR:-${T[0]}}"; BSZ="${BSZ:-${T[1]}}"; UPDATES="${UPDATES:-${T[2]}}"; WARMUP="${WARMUP:-${T[3]}}"

mapfile -t MODEL < <("$PY" "$SCRIPTS_DIR/ckpt_info.py" "$CKPT" --model-flags)
[[ ${#MODEL[@]} -gt 0 ]] || die "could not read the model options of $CKPT"
# the positions it was pre-trained with: model.max_positions, else (fairseq-hydra-train keeps no
# model.max_positions) the tokens_per_sample the model took it from
MAXPOS="$("$PY" "$SCRIPTS_DIR/ckpt_info.py" "$CKPT" model.max_positions 2>/dev/null \
  || "$PY" "$SCRIPTS_DIR/ckpt_info.py" "$CKPT" task.tokens_per_sample 2>/dev/null)" \
  || die "could not read the positions $CKPT was pre-trained with (neither model.max_positions nor task.tokens_per_sample is in its config)"

if [[ "$NUM_CLASSES" == 1 ]]; then
  BEST=(--regression-target --best-checkpoint-metric loss)
else
  BEST=(--best-checkpoint-metric accuracy --maximize-best-checkpoint-metric)
fi
DEVICE=(); EVAL_DEVICE=()
if [[ "$CPU" == 1 ]] || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=(--cpu); EVAL_DEVICE=(--cpu)
else
  # per-parameter fp32 masters: the same arithmetic as fairseq's flat copy, and allowed with expert parallelism
  DEVICE=(--fp16 --fp16-no-flatten-grads --fp16-init-scale 4 --threshold-loss-scale 1 --fp16-scale-window 128)
fi

# an earlier fine-tune's checkpoint_best.pt, dev_metrics.json and train.log would be overwritten or
# appended to (fairseq's best-checkpoint tracking starts anew in each process): move them aside
if [[ -d "$SAVE" && -n "$(ls -A "$SAVE")" ]]; then
  echo "  an earlier fine-tune in $SAVE was moved to $(move_aside "$SAVE")" >&2
fi
mkdir -p "$SAVE"
step "fine-tune $CKPT on $TASK (lr $LR, batch $BSZ, $UPDATES updates, warm-up $WARMUP) -> $SAVE"
"$(fairseq_tool fairseq-train)" "$DATA" --user-dir "$USER_DIR" \
  --restore-file "$CKPT" --reset-optimizer --reset-dataloader --reset-meters \
  --task sentence_prediction --criterion moe_sentence_prediction --num-classes "$NUM_CLASSES" \
  --init-token 0 --separator-token 2 --max-positions "$MAXPOS" --shorten-method truncate \
  "${MODEL[@]}" --dropout 0.1 --attention-dropout 0.1 \
  --batch-size "$BSZ" --max-tokens 4400 --required-batch-size-multiple 1 \
  --optimizer adam --adam-betas "(0.9, 0.98)" --adam-eps 1e-06 --weight-decay 0.1 --clip-norm 0.0 \
  --lr-scheduler polynomial_decay --lr "$LR" --total-num-update "$UPDATES" --warmup-updates "$WARMUP" \
  --max-update "$UPDATES" --max-epoch 10 "${BEST[@]}" "${DEVICE[@]}" \
  --save-dir "$SAVE" --no-epoch-checkpoints --no-last-checkpoints --log-format json --log-file "$SAVE/train.log" \
  "${EXTRA[@]}"

step "evaluate $SAVE/checkpoint_best.pt on the dev split"
"$PY" "$SCRIPTS_DIR/glue_eval.py" --task "$TASK" --data "$DATA" --checkpoint "$SAVE/checkpoint_best.pt" \
  --json "$SAVE/dev_metrics.json" "${EVAL_DEVICE[@]}"
