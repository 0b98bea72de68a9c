#!/usr/bin/env bash
# WikiText-2 (tokenized, shipped) for fairseq language modelling (GPT) and masked LM (RoBERTa).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<USAGE
Usage: bash scripts/prepare_wikitext.sh [options]

Binarizes the shipped WikiText-2 (train 36,718 lines / 2.1M tokens, valid, test) with
fairseq-preprocess --only-source. By default the word-level text is kept as it is (33,278-word
vocabulary, the standard setting for word-level perplexity); --spm-vocab N trains a sentencepiece
model instead (smaller vocabulary, faster on CPU, perplexities then are per subword).

Options:
  --data-dir DIR     folder holding wikitext-2/ (default: \$EVOMOE_DATA or ../shared/data)
  --out-dir DIR      output folder (default: data-bin/wikitext-2)
  --spm-vocab N      sentencepiece vocabulary size; 0 = word level (default 0)
  --threshold N      map words seen fewer than N times in train to <unk> (default 0 = keep all)
  --train-lines N    use only the first N training lines (default: all)
  --valid-lines N    use only the first N validation lines (default: all)
  --test-lines N     use only the first N test lines (default: all)
  --workers N        fairseq-preprocess workers (default 2)
  -h, --help         this message

Output: OUT/raw, OUT/bin (fairseq binary data; dict.txt), OUT/spm.model with --spm-vocab.
An earlier preparation's outputs in OUT are moved to OUT/previous-<time>/ first, never deleted.
USAGE
}

DATA_DIR="$(default_data_dir)"; OUT=data-bin/wikitext-2; VOCAB=0; THRESH=0
TRAIN_LINES=0; VALID_LINES=0; TEST_LINES=0; WORKERS=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data-dir) need_value "$@"; DATA_DIR="$2"; shift 2 ;;
    --out-dir) need_value "$@"; OUT="$2"; shift 2 ;;
    --spm-vocab) need_value "$@"; need_int "$1" "$2"; VOCAB="$2"; shift 2 ;;
    --threshold) need_value "$@"; need_int "$1" "$2"; THRESH="$2"; shift 2 ;;
    --train-lines) need_value "$@"; need_int "$1" "$2"; TRAIN_LINES="$2"; shift 2 ;;
    --valid-lines) need_value "$@"; need_int "$1" "$2"; VALID_LINES="$2"; shift 2 ;;
    --test-lines) need_value "$@"; need_int "$1" "$2"; TEST_LINES="$2"; shift 2 ;;
    --workers) need_value "$@"; need_int "$1" "$2"; WORKERS="$2"; shift 2 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
[[ -n "$DATA_DIR" ]] || die "no data folder: pass --data-dir (the folder holding wikitext-2/) or set EVOMOE_DATA"
W="$DATA_DIR/wikitext-2"
[[ -f "$W/train.txt.gz" || -f "$W/train.txt" ]] || die "--data-dir $DATA_DIR has no wikitext-2/train.txt(.gz) (the shipped WikiText-2)"
TRAIN_SRC="$W/train.txt.gz"; [[ -f "$TRAIN_SRC" ]] || TRAIN_SRC="$W/train.txt"
mkdir -p "$OUT/raw" "$OUT/tok"
keep_earlier_preparation "$OUT" bin spm.model spm.vocab

step "1/3 copy raw text from $W"
"$PY" "$SCRIPTS_DIR/textprep.py" copy "$TRAIN_SRC" "$OUT/raw/train.txt" --lines "$TRAIN_LINES"
"$PY" "$SCRIPTS_DIR/textprep.py" copy "$W/valid.txt" "$OUT/raw/valid.txt" --lines "$VALID_LINES"
"$PY" "$SCRIPTS_DIR/textprep.py" copy "$W/test.txt" "$OUT/raw/test.txt" --lines "$TEST_LINES"

if [[ "$VOCAB" -gt 0 ]]; then
  step "2/3 sentencepiece (vocab $VOCAB)"
  "$PY" "$SCRIPTS_DIR/textprep.py" spm-train --input "$OUT/raw/train.txt" --model-prefix "$OUT/spm" --vocab-size "$VOCAB"
  for S in train valid test; do
    "$PY" "$SCRIPTS_DIR/textprep.py" spm-encode --model "$OUT/spm.model" --input "$OUT/raw/$S.txt" --output "$OUT/tok/$S.txt"
  done
else
  step "2/3 word level (no sentencepiece)"
  cp "$OUT/raw/"*.txt "$OUT/tok/"
fi

step "3/3 fairseq-preprocess -> $OUT/bin"
"$(fairseq_tool fairseq-preprocess)" --only-source --trainpref "$OUT/tok/train.txt" --validpref "$OUT/tok/valid.txt" \
  --testpref "$OUT/tok/test.txt" --destdir "$OUT/bin" --workers "$WORKERS" --thresholdsrc "$THRESH" >"$OUT/preprocess.log" 2>&1 \
  || { tail -20 "$OUT/preprocess.log" >&2; die "fairseq-preprocess failed (log: $OUT/preprocess.log)"; }
grep -E "\] (Dictionary|.*sents)" "$OUT/preprocess.log" | sed 's/.*preprocess[^[]*/  /' >&2 || true
[[ -f "$OUT/bin/train.bin" ]] || die "fairseq-preprocess did not write $OUT/bin/train.bin"

echo "WikiText-2 ready:"
echo "  binary data   $OUT/bin   (fairseq-train $OUT/bin --task language_modeling ...)"
[[ "$VOCAB" -gt 0 ]] && echo "  sentencepiece $OUT/spm.model"
echo "  vocabulary    $(wc -l < "$OUT/bin/dict.txt") entries (+4 specials)"
