#!/usr/bin/env bash
# Multi30k (Task 1) En<->De from the shipped raw corpus: sentencepiece (joint) + fairseq-preprocess.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<USAGE
Usage: bash scripts/prepare_multi30k.sh [options]

Prepares Multi30k Task 1 (train 29k pairs, val 1,014, test_2016_flickr 1,000) for fairseq:
trains a joint sentencepiece model on the training text, encodes every split and binarizes it
with a joined dictionary.

Options:
  --data-dir DIR     folder holding multi30k/ (default: \$EVOMOE_DATA or ../shared/data)
  --out-dir DIR      output folder (default: data-bin/multi30k_<src>_<tgt>)
  --src LANG         source language, de or en (default: de)
  --tgt LANG         target language (default: the other one)
  --test-set NAME    test split: test_2016_flickr, test_2017_flickr, test_2017_mscoco, test_2018_flickr
                     (default: test_2016_flickr)
  --spm-vocab N      sentencepiece vocabulary size (default 8000); 0 = keep whitespace tokens
  --train-lines N    use only the first N training pairs (default: all)
  --valid-lines N    use only the first N validation pairs (default: all)
  --test-lines N     use only the first N test pairs (default: all)
  --workers N        fairseq-preprocess workers (default 2)
  -h, --help         this message

Output: OUT/raw (plain text; references for BLEU), OUT/spm.model, OUT/bin (fairseq binary data).
An earlier preparation's outputs in OUT are moved to OUT/previous-<time>/ first, never deleted.
USAGE
}

DATA_DIR="$(default_data_dir)"; OUT=""; SRC=de; TGT=""; TEST=test_2016_flickr; VOCAB=8000
TRAIN_LINES=0; VALID_LINES=0; TEST_LINES=0; WORKERS=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data-dir) need_value "$@"; DATA_DIR="$2"; shift 2 ;;
    --out-dir) need_value "$@"; OUT="$2"; shift 2 ;;
    --src) need_value "$@"; SRC="$2"; shift 2 ;;
    --tgt) need_value "$@"; TGT="$2"; shift 2 ;;
    --test-set) need_value "$@"; TEST="$2"; shift 2 ;;
    --spm-vocab) need_value "$@"; need_int "$1" "$2"; VOCAB="$2"; shift 2 ;;
    --train-lines) need_value "$@"; need_int "$1" "$2"; TRAIN_LINES="$2"; shift 2 ;;
    --valid-lines) need_value "$@"; need_int "$1" "$2"; VALID_LINES="$2"; shift 2 ;;
    --test-lines) need_value "$@"; need_int "$1" "$2"; TEST_LINES="$2"; shift 2 ;;
    --workers) need_value "$@"; need_int "$1" "$2"; WORKERS="$2"; shift 2 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
[[ "$SRC" == de || "$SRC" == en ]] || die "--src must be de or en, got '$SRC'"
[[ -z "$TGT" ]] && { [[ "$SRC" == de ]] && TGT=en || TGT=de; }
[[ "$TGT" == de || "$TGT" == en ]] && [[ "$TGT" != "$SRC" ]] || die "--tgt must be the other language (de/en), got '$TGT'"
[[ -n "$DATA_DIR" ]] || die "no data folder: pass --data-dir (the folder holding multi30k/) or set EVOMOE_DATA"
M="$DATA_DIR/multi30k"
[[ -f "$M/train.$SRC" ]] || die "--data-dir $DATA_DIR has no multi30k/train.$SRC (the shipped Multi30k corpus)"
[[ -f "$M/$TEST.$SRC" ]] || die "--test-set $TEST: $M/$TEST.$SRC does not exist"
OUT="${OUT:-data-bin/multi30k_${SRC}_${TGT}}"
mkdir -p "$OUT/raw" "$OUT/spm"
keep_earlier_preparation "$OUT" bin spm.model spm.vocab

step "1/4 copy raw text from $M"
for L in "$SRC" "$TGT"; do
  "$PY" "$SCRIPTS_DIR/textprep.py" copy "$M/train.$L" "$OUT/raw/train.$L" --lines "$TRAIN_LINES"
  "$PY" "$SCRIPTS_DIR/textprep.py" copy "$M/val.$L" "$OUT/raw/valid.$L" --lines "$VALID_LINES"
  "$PY" "$SCRIPTS_DIR/textprep.py" copy "$M/$TEST.$L" "$OUT/raw/test.$L" --lines "$TEST_LINES"
done

if [[ "$VOCAB" -gt 0 ]]; then
  step "2/4 train a joint sentencepiece model (vocab $VOCAB)"
  "$PY" "$SCRIPTS_DIR/textprep.py" spm-train --input "$OUT/raw/train.$SRC" "$OUT/raw/train.$TGT" \
    --model-prefix "$OUT/spm" --vocab-size "$VOCAB"
  step "3/4 encode with sentencepiece"
  for S in train valid test; do for L in "$SRC" "$TGT"; do
    "$PY" "$SCRIPTS_DIR/textprep.py" spm-encode --model "$OUT/spm.model" --input "$OUT/raw/$S.$L" --output "$OUT/spm/$S.$L"
  done; done
else
  step "2-3/4 no sentencepiece (--spm-vocab 0): whitespace tokens"
  cp "$OUT"/raw/*."$SRC" "$OUT"/raw/*."$TGT" "$OUT/spm/"
fi

step "4/4 fairseq-preprocess -> $OUT/bin"
"$(fairseq_tool fairseq-preprocess)" --source-lang "$SRC" --target-lang "$TGT" \
  --trainpref "$OUT/spm/train" --validpref "$OUT/spm/valid" --testpref "$OUT/spm/test" \
  --destdir "$OUT/bin" --joined-dictionary --workers "$WORKERS" >"$OUT/preprocess.log" 2>&1 \
  || { tail -20 "$OUT/preprocess.log" >&2; die "fairseq-preprocess failed (log: $OUT/preprocess.log)"; }
grep -E "\] (Dictionary|.*sents)" "$OUT/preprocess.log" | sed 's/.*preprocess[^[]*/  /' >&2 || true
[[ -f "$OUT/bin/train.$SRC-$TGT.$SRC.bin" ]] || die "fairseq-preprocess did not write $OUT/bin"

echo "Multi30k $SRC->$TGT ready:"
echo "  binary data      $OUT/bin   (fairseq-train $OUT/bin --task translation -s $SRC -t $TGT ...)"
[[ "$VOCAB" -gt 0 ]] && echo "  sentencepiece    $OUT/spm.model"
echo "  raw references   $OUT/raw/{valid,test}.$TGT"
