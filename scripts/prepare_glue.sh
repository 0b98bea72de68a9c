#!/usr/bin/env bash
# A GLUE task for fine-tuning RoBERTa(-MoE) with fairseq's sentence_prediction task.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<USAGE
Usage: bash scripts/prepare_glue.sh --task TASK --dict DICT (--download | --tsv-dir DIR) [options]

Turns one GLUE task's train and dev TSVs into fairseq's sentence_prediction layout:
OUT/input0 (and OUT/input1 for sentence pairs) binarized with the pre-trained model's dictionary,
OUT/label (a label dictionary, or the raw scores for STS-B). The dev split becomes 'valid'.

Tasks: CoLA, SST-2, MRPC, QQP, STS-B, MNLI (dev = dev_matched), QNLI, RTE.

Where the TSVs come from (one of):
  --download         from GLUE's canonical hosts (dl.fbaipublicfiles.com/glue/data/<TASK>.zip;
                     MRPC from SentEval's copy of the Microsoft corpus and GLUE's dev ids) into
                     OUT/../glue_data/<TASK>/
  --tsv-dir DIR      a folder of GLUE TSVs: DIR/<TASK>/train.tsv and dev.tsv (GLUE's layout), or
                     DIR/train.tsv and DIR/dev.tsv; nothing is downloaded

Options:
  --task TASK        the GLUE task (required)
  --dict FILE        dict.txt of the pre-training data (required): the fine-tuning data must use
                     the pre-trained model's vocabulary
  --spm-model FILE   tokenise with this sentencepiece model (when the pre-training data was)
  --gpt2-bpe         tokenise with GPT-2 BPE (the released fairseq RoBERTa models; downloads its
                     encoder.json and vocab.bpe on first use)
                     (neither: whitespace-separated words, as the word-level WikiText data)
  --out-dir DIR      output folder (default: data-bin/glue/<TASK>-bin); an earlier preparation's
                     input0/, input1/ and label/ there are moved to DIR/previous-<time>/ first
  --workers N        fairseq-preprocess workers (default 2)
  -h, --help         this message

Then: bash scripts/finetune_glue.sh TASK CHECKPOINT --data OUT
USAGE
}

TASK=""; DICT=""; TSV=""; DOWNLOAD=0; SPM=""; GPT2=0; OUT=""; WORKERS=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --task) need_value "$@"; TASK="$2"; shift 2 ;;
    --dict) need_value "$@"; DICT="$2"; shift 2 ;;
    --tsv-dir) need_value "$@"; TSV="$2"; shift 2 ;;
    --download) DOWNLOAD=1; shift ;;
    --spm-model) need_value "$@"; SPM="$2"; shift 2 ;;
    --gpt2-bpe) GPT2=1; shift ;;
    --out-dir) need_value "$@"; OUT="$2"; shift 2 ;;
    --workers) need_value "$@"; need_int "$1" "$2"; WORKERS="$2"; shift 2 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
[[ -n "$TASK" ]] || { usage >&2; die "--task is required"; }
glue_task_info "$TASK"  # NUM_CLASSES, METRIC, PAIR (or a clear error)
[[ -n "$DICT" ]] || die "--dict is required (dict.txt of the data the model was pre-trained on)"
[[ -f "$DICT" ]] || die "--dict $DICT does not exist"
[[ -n "$SPM" && ! -f "$SPM" ]] && die "--spm-model $SPM does not exist"
[[ -n "$SPM" && "$GPT2" == 1 ]] && die "--spm-model and --gpt2-bpe are alternatives; give one (or neither)"
[[ "$DOWNLOAD" == 1 && -n "$TSV" ]] && die "--download and --tsv-dir are alternatives; give one"
[[ "$DOWNLOAD" == 1 || -n "$TSV" ]] || die "give --tsv-dir DIR (a folder of GLUE TSVs) or --download"
[[ -z "$TSV" || -d "$TSV" ]] || die "--tsv-dir $TSV is not a folder"
OUT="${OUT:-data-bin/glue/$TASK-bin}"
mkdir -p "$OUT"
keep_earlier_preparation "$OUT" input0 input1 label

if [[ "$DOWNLOAD" == 1 ]]; then
  TSV="$(dirname "$OUT")/glue_data"
  mkdir -p "$TSV"
  if [[ "$TASK" == MRPC ]]; then
    step "1/3 download MRPC"
    mkdir -p "$TSV/MRPC"
    fetch https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt "$TSV/MRPC/msr_paraphrase_train.txt"
    fetch "https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/o/data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc" "$TSV/MRPC/dev_ids.tsv"
    # GLUE's split: the dev ids' pairs of the Microsoft training file are dev, the rest train
    "$PY" - "$TSV/MRPC" <<'PYEOF'
import sys
from pathlib import Path
d = Path(sys.argv[1])
ids = {tuple(l.split("\t")[:2]) for l in (d / "dev_ids.tsv").read_text(encoding="utf-8-sig").splitlines() if l.strip()}
lines = (d / "msr_paraphrase_train.txt").read_text(encoding="utf-8-sig").splitlines()
with open(d / "train.tsv", "w") as tr, open(d / "dev.tsv", "w") as dv:
    tr.write(lines[0] + "\n"); dv.write(lines[0] + "\n")
    for l in lines[1:]:
        (dv if tuple(l.split("\t")[1:3]) in ids else tr).write(l + "\n")
PYEOF
  else
    step "1/3 download $TASK"
    ZIP="$TASK"; [[ "$TASK" == QQP ]] && ZIP=QQP-clean; [[ "$TASK" == QNLI ]] && ZIP=QNLIv2
    fetch "https://dl.fbaipublicfiles.com/glue/data/$ZIP.zip" "$TSV/$ZIP.zip"
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$TSV/$ZIP.zip" "$TSV"
  fi
else
  step "1/3 GLUE TSVs from $TSV"
fi

step "2/3 extract and tokenise the inputs and labels"
TOK=(); [[ -n "$SPM" ]] && TOK=(--spm-model "$SPM"); [[ "$GPT2" == 1 ]] && TOK=(--gpt2-bpe)
"$PY" "$SCRIPTS_DIR/glue_data.py" extract --task "$TASK" --tsv-dir "$TSV" --out "$OUT/raw" "${TOK[@]}"

step "3/3 fairseq-preprocess -> $OUT"
PRE="$(fairseq_tool fairseq-preprocess)"
INPUTS=(input0); [[ "$PAIR" == 1 ]] && INPUTS+=(input1)
for I in "${INPUTS[@]}"; do
  "$PRE" --only-source --trainpref "$OUT/raw/train.$I" --validpref "$OUT/raw/valid.$I" \
    --destdir "$OUT/$I" --srcdict "$DICT" --workers "$WORKERS" >/dev/null
done
if [[ "$NUM_CLASSES" == 1 ]]; then  # regression (STS-B): sentence_prediction reads the scores as text
  mkdir -p "$OUT/label"
  cp "$OUT/raw/train.label" "$OUT/label/train.label"
  cp "$OUT/raw/valid.label" "$OUT/label/valid.label"
else
  "$PRE" --only-source --trainpref "$OUT/raw/train.label" --validpref "$OUT/raw/valid.label" \
    --destdir "$OUT/label" --workers "$WORKERS" >/dev/null
fi
echo "$TASK ($METRIC, $NUM_CLASSES class(es)) -> $OUT"
