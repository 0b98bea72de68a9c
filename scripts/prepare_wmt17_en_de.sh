#!/usr/bin/env bash
# WMT17 English-German for fairseq: download (or take local files), clean, sentencepiece, binarize.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<USAGE
Usage: bash scripts/prepare_wmt17_en_de.sh [options]              # download mode (needs internet)
       bash scripts/prepare_wmt17_en_de.sh --raw-dir DIR [options]  # local files, no download

Download mode fetches the WMT17 En-De training corpora from statmt.org (Europarl v7, Common Crawl,
News Commentary v12, Rapid 2016; about 4.5M pairs, 1.3 GB) and the newstest sets (newstest2016 =
valid, newstest2017 = test, from the WMT17 dev/test archives), then runs the same pipeline as the
local mode:
  1. gather plain text     2. clean (Moses unescape, length <= --max-len, ratio <= --ratio, dedup)
  3. train a joint sentencepiece model   4. encode   5. fairseq-preprocess --joined-dictionary

Local mode (--raw-dir DIR): DIR/train.SRC and DIR/train.TGT are the training text (tokenised or
not); valid from DIR/valid.* (or --valid-prefix), test from --test-prefix (or DIR/test.*). E.g. the
shipped sample + newstest2014:
  bash scripts/prepare_wmt17_en_de.sh --raw-dir ../shared/data/wmt-ende-sample10k \\
      --test-prefix ../shared/data/wmt14-newstest2014-de-en/newstest2014 --spm-vocab 8000

Options:
  --raw-dir DIR        local mode: folder with train.{SRC,TGT} (no download)
  --valid-prefix P     validation files P.SRC / P.TGT (default: RAW/valid; download: newstest2016)
  --test-prefix P      test files P.SRC / P.TGT, plain text (default: RAW/test; download: newstest2017)
  --out-dir DIR        output folder (default: data-bin/wmt17_en_de)
  --src LANG --tgt LANG   direction (default: en -> de)
  --spm-vocab N        joint sentencepiece vocabulary (default 32000)
  --spm-model-type T   unigram or bpe (default bpe)
  --spm-sentences N    sentences sampled to train sentencepiece (default 2000000)
  --max-len N          drop pairs with a side longer than N words (default 250)
  --ratio X            drop pairs whose length ratio exceeds X (default 1.5, +3 words slack)
  --train-lines N      use only the first N training pairs (default: all)
  --workers N          fairseq-preprocess workers (default 4)
  -h, --help           this message

Output: OUT/raw (cleaned text, references), OUT/spm.model, OUT/bin (fairseq binary data).
An earlier preparation's outputs in OUT are moved to OUT/previous-<time>/ first, never deleted.
Then: fairseq-hydra-train --config-dir configs --config-name wmt17_en_de gate=evomoe
USAGE
}

RAW=""; VALIDP=""; TESTP=""; OUT=data-bin/wmt17_en_de; SRC=en; TGT=de; VOCAB=32000; MTYPE=bpe; SPMN=2000000
MAXLEN=250; RATIO=1.5; TRAIN_LINES=0; WORKERS=4
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --raw-dir) need_value "$@"; RAW="$2"; shift 2 ;;
    --valid-prefix) need_value "$@"; VALIDP="$2"; shift 2 ;;
    --test-prefix) need_value "$@"; TESTP="$2"; shift 2 ;;
    --out-dir) need_value "$@"; OUT="$2"; shift 2 ;;
    --src) need_value "$@"; SRC="$2"; shift 2 ;;
    --tgt) need_value "$@"; TGT="$2"; shift 2 ;;
    --spm-vocab) need_value "$@"; need_int "$1" "$2"; VOCAB="$2"; shift 2 ;;
    --spm-model-type) need_value "$@"; MTYPE="$2"; shift 2 ;;
    --spm-sentences) need_value "$@"; need_int "$1" "$2"; SPMN="$2"; shift 2 ;;
    --max-len) need_value "$@"; need_int "$1" "$2"; MAXLEN="$2"; shift 2 ;;
    --ratio) need_value "$@"; RATIO="$2"; shift 2 ;;
    --train-lines) need_value "$@"; need_int "$1" "$2"; TRAIN_LINES="$2"; shift 2 ;;
    --workers) need_value "$@"; need_int "$1" "$2"; WORKERS="$2"; shift 2 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
[[ "$SRC" =~ ^(en|de)$ && "$TGT" =~ ^(en|de)$ && "$SRC" != "$TGT" ]] || die "--src/--tgt must be en and de (either direction), got '$SRC' -> '$TGT'"
[[ "$MTYPE" =~ ^(unigram|bpe)$ ]] || die "--spm-model-type must be unigram or bpe, got '$MTYPE'"
[[ "$VOCAB" -ge 100 ]] || die "--spm-vocab must be at least 100, got $VOCAB"
[[ "$RATIO" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--ratio must be a number, got '$RATIO'"
mkdir -p "$OUT/raw" "$OUT/spm"
keep_earlier_preparation "$OUT" bin spm.model spm.vocab
G="$OUT/gathered"; mkdir -p "$G"

if [[ -n "$RAW" ]]; then
  # ---------------------------------------------------------------- local mode
  [[ -d "$RAW" ]] || die "--raw-dir $RAW is not a folder"
  for L in "$SRC" "$TGT"; do [[ -f "$RAW/train.$L" || -f "$RAW/train.$L.gz" ]] || die "--raw-dir $RAW has no train.$L"; done
  VALIDP="${VALIDP:-$RAW/valid}"; TESTP="${TESTP:-$RAW/test}"
  step "1/5 gather local text from $RAW"
  for L in "$SRC" "$TGT"; do
    f="$RAW/train.$L"; [[ -f "$f" ]] || f="$f.gz"
    "$PY" "$SCRIPTS_DIR/textprep.py" copy "$f" "$G/train.$L" --lines "$TRAIN_LINES"
  done
else
  # ---------------------------------------------------------------- download mode
  D="$OUT/download"; mkdir -p "$D"
  step "1/5 download WMT17 En-De (about 1.3 GB) into $D"
  ST=http://data.statmt.org/wmt17/translation-task
  URLS=(
    "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz"
    "http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz"
    "$ST/training-parallel-nc-v12.tgz"
    "$ST/rapid2016.tgz"
    "$ST/dev.tgz"
    "$ST/test.tgz"
  )
  i=0
  for u in "${URLS[@]}"; do
    i=$((i + 1)); echo "  [$i/${#URLS[@]}] $(basename "$u")" >&2
    fetch "$u" "$D/$(basename "$u")"
    [[ -f "$D/.extracted.$(basename "$u")" ]] || { tar -xzf "$D/$(basename "$u")" -C "$D" && touch "$D/.extracted.$(basename "$u")"; }
  done
  : > "$G/train.$SRC"; : > "$G/train.$TGT"
  found=0
  while IFS= read -r de; do
    base="${de%.de}"; [[ -f "$base.en" ]] || continue
    echo "  corpus $(basename "$base"): $(wc -l < "$de") pairs" >&2
    cat "$base.$SRC" >> "$G/train.$SRC"; cat "$base.$TGT" >> "$G/train.$TGT"; found=$((found + 1))
  done < <(find "$D" -name "*.de-en.de" | sort)
  [[ "$found" -ge 4 ]] || die "expected 4 training corpora (*.de-en.de) in $D, found $found; remove $D and retry"
  if [[ "$TRAIN_LINES" -gt 0 ]]; then
    for L in "$SRC" "$TGT"; do head -n "$TRAIN_LINES" "$G/train.$L" > "$G/t.$L" && mv "$G/t.$L" "$G/train.$L"; done
  fi
  sgm() {  # sgm YEAR LANG OUT: newstestYEAR in LANG from the en-de SGML files
    local f; f="$(find "$D" -name "newstest$1-ende-*.$2.sgm" | head -1)"
    [[ -n "$f" ]] || f="$(find "$D" -name "newstest$1-deen-*.$2.sgm" | head -1)"
    [[ -n "$f" ]] || die "newstest$1 ($2) not found in the WMT17 dev/test archives under $D"
    "$PY" "$SCRIPTS_DIR/textprep.py" sgm2txt "$f" "$3"
  }
  if [[ -z "$VALIDP" ]]; then for L in "$SRC" "$TGT"; do sgm 2016 "$L" "$G/newstest2016.$L"; done; VALIDP="$G/newstest2016"; fi
  if [[ -z "$TESTP" ]]; then for L in "$SRC" "$TGT"; do sgm 2017 "$L" "$G/newstest2017.$L"; done; TESTP="$G/newstest2017"; fi
fi
for P in "$VALIDP" "$TESTP"; do
  for L in "$SRC" "$TGT"; do [[ -f "$P.$L" ]] || die "missing $P.$L (check --valid-prefix / --test-prefix)"; done
done

step "2/5 clean the training pairs (max $MAXLEN words, ratio $RATIO, dedup, Moses unescape)"
"$PY" "$SCRIPTS_DIR/textprep.py" clean --src "$G/train.$SRC" --tgt "$G/train.$TGT" --out-src "$OUT/raw/train.$SRC" \
  --out-tgt "$OUT/raw/train.$TGT" --max-len "$MAXLEN" --ratio "$RATIO" --unescape --dedup
rm -f "$G/train.$SRC" "$G/train.$TGT"  # the cleaned copy in OUT/raw is what the next steps use
for S in valid test; do
  P="$VALIDP"; [[ "$S" == test ]] && P="$TESTP"
  # dev/test keep every line (no filtering; BLEU needs them complete), only Moses escapes undone
  "$PY" -c "
import sys; sys.path.insert(0, sys.argv[1]); from textprep import unescape
for src, dst in zip(sys.argv[2::2], sys.argv[3::2]):
    with open(src, encoding='utf-8') as f, open(dst, 'w', encoding='utf-8') as o:
        for line in f: o.write(unescape(' '.join(line.split())) + '\n')
" "$SCRIPTS_DIR" "$P.$SRC" "$OUT/raw/$S.$SRC" "$P.$TGT" "$OUT/raw/$S.$TGT"
done

step "3/5 train a joint sentencepiece model ($MTYPE, vocab $VOCAB)"
"$PY" "$SCRIPTS_DIR/textprep.py" spm-train --input "$OUT/raw/train.$SRC" "$OUT/raw/train.$TGT" --model-prefix "$OUT/spm" \
  --vocab-size "$VOCAB" --model-type "$MTYPE" --input-sentence-size "$SPMN"

step "4/5 encode with sentencepiece"
for S in train valid test; do for L in "$SRC" "$TGT"; do
  "$PY" "$SCRIPTS_DIR/textprep.py" spm-encode --model "$OUT/spm.model" --input "$OUT/raw/$S.$L" --output "$OUT/spm/$S.$L"
done; done

step "5/5 fairseq-preprocess -> $OUT/bin"
"$(fairseq_tool fairseq-preprocess)" --source-lang "$SRC" --target-lang "$TGT" --trainpref "$OUT/spm/train" \
  --validpref "$OUT/spm/valid" --testpref "$OUT/spm/test" --destdir "$OUT/bin" --joined-dictionary \
  --workers "$WORKERS" >"$OUT/preprocess.log" 2>&1 || { tail -20 "$OUT/preprocess.log" >&2; die "fairseq-preprocess failed (log: $OUT/preprocess.log)"; }
grep -E "\] (Dictionary|.*sents)" "$OUT/preprocess.log" | sed 's/.*preprocess[^[]*/  /' >&2 || true
[[ -f "$OUT/bin/train.$SRC-$TGT.$SRC.bin" ]] || die "fairseq-preprocess did not write $OUT/bin"

echo "WMT En-De ($SRC->$TGT) ready:"
echo "  binary data     $OUT/bin"
echo "  sentencepiece   $OUT/spm.model"
echo "  references      $OUT/raw/test.$TGT (detokenised; for scripts/evaluate_translation.sh --ref)"
