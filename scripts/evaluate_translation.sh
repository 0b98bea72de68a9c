#!/usr/bin/env bash
# Translate a test set with fairseq-generate (beam 5) and score detokenised output with sacrebleu.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
export PYTHONWARNINGS=ignore

usage() {
  cat <<USAGE
Usage: bash scripts/evaluate_translation.sh --data-bin DIR --checkpoint CKPT [options]

Runs fairseq-generate on a binarized split, undoes the subword segmentation (sentencepiece by
default), and scores the detokenised hypotheses with sacrebleu against the raw reference text
(--ref), or against the detokenised binarized targets when no --ref is given.

Options:
  --data-bin DIR      binarized data (from scripts/prepare_*.sh: OUT/bin)              [required]
  --checkpoint CKPT   model checkpoint (e.g. checkpoints/.../checkpoint_best.pt)       [required]
  --subset NAME       split to translate: test or valid (default: test)
  --ref FILE          raw (untokenised) reference file, line-aligned with the split (recommended;
                      e.g. OUT/raw/test.en); default: the detokenised targets of the split
  --src LANG / --tgt LANG   languages (default: read from the data-bin file names)
  --post-process P    subword scheme to undo: sentencepiece (default), subword_nmt, none
  --beam N            beam size (default 5)
  --lenpen X          length penalty (default 1.0)
  --max-len-a A --max-len-b B   hypotheses at most A * source length + B tokens (fairseq's defaults 0, 200)
  --batch-size N      sentences per batch (default 64)
  --out-dir DIR       where hypotheses and the score go (default: next to the checkpoint)
  --task NAME         fairseq task (default: the checkpoint's own, e.g. evomoe_translation for EvoMoE)
  --cpu               run on CPU (default: automatic, CPU when no GPU)
  -h, --help          this message

Writes OUT/generate-<subset>.txt (fairseq output), OUT/hyp.<subset>.detok.txt and
OUT/bleu.<subset>.json (sacrebleu's JSON, "score" = BLEU), and prints the BLEU line.
USAGE
}

DATA=""; CKPT=""; SUBSET=test; REF=""; SRC=""; TGT=""; POST=sentencepiece; BEAM=5; LENPEN=1.0; MAXA=0; MAXB=200; BSZ=64; OUT=""; CPU=""; TASK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data-bin) need_value "$@"; DATA="$2"; shift 2 ;;
    --checkpoint) need_value "$@"; CKPT="$2"; shift 2 ;;
    --subset) need_value "$@"; SUBSET="$2"; shift 2 ;;
    --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --src) need_value "$@"; SRC="$2"; shift 2 ;;
    --tgt) need_value "$@"; TGT="$2"; shift 2 ;;
    --post-process) need_value "$@"; POST="$2"; shift 2 ;;
    --beam) need_value "$@"; need_int "$1" "$2"; BEAM="$2"; shift 2 ;;
    --lenpen) need_value "$@"; LENPEN="$2"; shift 2 ;;
    --max-len-a) need_value "$@"; MAXA="$2"; shift 2 ;;
    --max-len-b) need_value "$@"; need_int "$1" "$2"; MAXB="$2"; shift 2 ;;
    --batch-size) need_value "$@"; need_int "$1" "$2"; BSZ="$2"; shift 2 ;;
    --out-dir) need_value "$@"; OUT="$2"; shift 2 ;;
    --task) need_value "$@"; TASK="$2"; shift 2 ;;
    --cpu) CPU=--cpu; shift ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
need_data_and_checkpoint "$DATA" "$CKPT"
[[ -z "$REF" || -f "$REF" ]] || die "--ref $REF does not exist"
case "$POST" in sentencepiece|subword_nmt|none) ;; *) die "--post-process must be sentencepiece, subword_nmt or none, got '$POST'";; esac
if [[ -z "$SRC" || -z "$TGT" ]]; then
  f="$(ls "$DATA"/"$SUBSET".*-*.*.idx 2>/dev/null | head -1 || true)"
  [[ -n "$f" ]] || die "--data-bin $DATA has no binarized '$SUBSET' split (expected $SUBSET.SRC-TGT.*.idx); check --subset"
  pair="$(basename "$f" | cut -d. -f2)"; SRC="${SRC:-${pair%-*}}"; TGT="${TGT:-${pair#*-}}"
fi
OUT="${OUT:-$(dirname "$CKPT")/eval}"
mkdir -p "$OUT"
if [[ -z "$TASK" ]]; then
  TASK="$("$PY" "$SCRIPTS_DIR/ckpt_info.py" "$CKPT" task._name 2>/dev/null | tail -1)" || die "cannot read the task from --checkpoint $CKPT; pass --task"
fi
[[ -n "$CPU" ]] || "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || CPU=--cpu

POSTARG=(); [[ "$POST" != none ]] && POSTARG=(--post-process "$POST")
step "fairseq-generate $SUBSET ($SRC->$TGT, beam $BEAM) with $CKPT"
"$(fairseq_tool fairseq-generate)" "$DATA" --user-dir "$USER_DIR" --task "$TASK" --path "$CKPT" --gen-subset "$SUBSET" \
  --source-lang "$SRC" --target-lang "$TGT" --beam "$BEAM" --lenpen "$LENPEN" --max-len-a "$MAXA" --max-len-b "$MAXB" --batch-size "$BSZ" --required-batch-size-multiple 1 \
  "${POSTARG[@]}" --results-path "$OUT" $CPU --log-format tqdm >/dev/null \
  || { tail -5 "$OUT/generate-$SUBSET.txt" >&2 || true; die "fairseq-generate failed (log: $OUT/generate-$SUBSET.txt)"; }
GEN="$OUT/generate-$SUBSET.txt"
[[ -s "$GEN" ]] || die "fairseq-generate wrote no output to $GEN"

# hypotheses (D- = detokenised) and references in the original sentence order
"$PY" - "$GEN" "$OUT/hyp.$SUBSET.detok.txt" "$OUT/ref.$SUBSET.detok.txt" <<'PYEOF'
import sys
gen, hyp_out, ref_out = sys.argv[1:]
hyp, ref = {}, {}
for line in open(gen, encoding="utf-8"):
    tag, _, rest = line.rstrip("\n").partition("\t")
    if tag.startswith("D-"):
        hyp[int(tag[2:])] = rest.split("\t", 1)[1] if "\t" in rest else ""
    elif tag.startswith("T-"):
        ref[int(tag[2:])] = rest
ids = sorted(hyp)
open(hyp_out, "w", encoding="utf-8").write("".join(hyp[i] + "\n" for i in ids))
open(ref_out, "w", encoding="utf-8").write("".join(ref.get(i, "") + "\n" for i in ids))
print(f"{len(ids)} hypotheses", file=sys.stderr)
PYEOF

REFFILE="$OUT/ref.$SUBSET.detok.txt"
if [[ -n "$REF" ]]; then
  n_h=$(wc -l < "$OUT/hyp.$SUBSET.detok.txt"); n_r=$(wc -l < "$REF")
  if [[ "$n_h" -eq "$n_r" ]]; then REFFILE="$REF"
  else head -n "$n_h" "$REF" > "$OUT/ref.$SUBSET.raw.txt"; REFFILE="$OUT/ref.$SUBSET.raw.txt"
       echo "note: scoring the first $n_h of $n_r reference lines" >&2; fi
fi
step "sacrebleu (detokenised) against $REFFILE"
"$(fairseq_tool sacrebleu)" "$REFFILE" -i "$OUT/hyp.$SUBSET.detok.txt" -m bleu -b -w 2 >/dev/null  # fails loudly on bad input
"$(fairseq_tool sacrebleu)" "$REFFILE" -i "$OUT/hyp.$SUBSET.detok.txt" -m bleu > "$OUT/bleu.$SUBSET.json"
BLEU="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['score'])" "$OUT/bleu.$SUBSET.json")"
echo "BLEU ($SUBSET, sacrebleu, detokenised) = $BLEU"
echo "  hypotheses  $OUT/hyp.$SUBSET.detok.txt"
echo "  score       $OUT/bleu.$SUBSET.json"
