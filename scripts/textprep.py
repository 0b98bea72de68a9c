#!/usr/bin/env python3
"""Text helpers shared by the data preparation scripts (each step shows a progress bar).

  textprep.py copy       SRC DST [--lines N] [--start K]       (gzip-aware head/copy)
  textprep.py sgm2txt    FILE.sgm OUT                          (<seg> contents, one per line)
  textprep.py clean      --src A --tgt B --out-src A2 --out-tgt B2 [--min-len 1] [--max-len 250] [--ratio 1.5]
                         [--unescape] [--dedup]
  textprep.py spm-train  --input F [F ...] --model-prefix P --vocab-size V [--model-type unigram|bpe]
                         [--input-sentence-size N]
  textprep.py spm-encode --model P.model --input F --output G
  textprep.py spm-decode --model P.model --input F --output G

Everything is plain Python + sentencepiece; nothing is downloaded here.
"""

import argparse
import gzip
import itertools
import re
import sys
from pathlib import Path

from tqdm import tqdm


def _open(path, mode="rt"):
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8", newline="\n")


def _count_lines(path) -> int:
    with _open(path) as f:
        return sum(1 for _ in f)


def _bar(total, desc):
    return tqdm(total=total, desc=desc, unit=" lines", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)


def cmd_copy(a):
    total = a.lines if a.lines else _count_lines(a.src)
    with _open(a.src) as f, _open(a.dst, "wt") as out, _bar(total, f"copy {Path(a.src).name}") as bar:
        stop = a.start + a.lines if a.lines else None
        for line in itertools.islice(f, a.start, stop):
            out.write(line if line.endswith("\n") else line + "\n")
            bar.update(1)


SEG = re.compile(r"<seg[^>]*>(.*)</seg>", re.IGNORECASE)


def cmd_sgm2txt(a):
    n = 0
    with _open(a.sgm) as f, _open(a.out, "wt") as out:
        for line in f:
            m = SEG.search(line)
            if m:
                out.write(" ".join(m.group(1).split()) + "\n")
                n += 1
    if n == 0:
        sys.exit(f"textprep sgm2txt: no <seg> lines found in {a.sgm}")
    print(f"{a.sgm}: {n} segments -> {a.out}", file=sys.stderr)


# Moses escapes its tokenizer writes; the shipped WMT sample and IWSLT files contain them.
_MOSES = {"&apos;": "'", "&quot;": '"', "&lt;": "<", "&gt;": ">", "&#91;": "[", "&#93;": "]", "&#124;": "|", "&amp;": "&"}
_MOSES_RE = re.compile("|".join(map(re.escape, _MOSES)))


def unescape(s: str) -> str:
    return _MOSES_RE.sub(lambda m: _MOSES[m.group(0)], s)


def cmd_clean(a):
    total = _count_lines(a.src)
    kept = dropped = 0
    seen = set()
    with _open(a.src) as fs, _open(a.tgt) as ft, _open(a.out_src, "wt") as os_, _open(a.out_tgt, "wt") as ot, _bar(
        total, f"clean {Path(a.src).name}"
    ) as bar:
        for s, t in itertools.zip_longest(fs, ft):
            bar.update(1)
            if s is None or t is None:
                sys.exit(f"textprep clean: {a.src} and {a.tgt} have different line counts")
            s, t = " ".join(s.split()), " ".join(t.split())
            if a.unescape:
                s, t = unescape(s), unescape(t)
            ls, lt = len(s.split()), len(t.split())
            ok = a.min_len <= ls <= a.max_len and a.min_len <= lt <= a.max_len
            ok = ok and max(ls, lt) <= a.ratio * min(ls, lt) + 3  # small sentences get some slack
            if ok and a.dedup:
                key = (s, t)
                ok = key not in seen
                seen.add(key)
            if ok:
                os_.write(s + "\n")
                ot.write(t + "\n")
                kept += 1
            else:
                dropped += 1
    print(f"clean: kept {kept} of {kept + dropped} pairs ({dropped} dropped) -> {a.out_src}, {a.out_tgt}", file=sys.stderr)
    if kept == 0:
        sys.exit("textprep clean: every pair was filtered out; check --min-len/--max-len/--ratio")


def cmd_spm_train(a):
    import sentencepiece as spm

    for f in a.input:
        if not Path(f).is_file():
            sys.exit(f"textprep spm-train: --input {f} does not exist")
    print(f"training sentencepiece ({a.model_type}, vocab {a.vocab_size}) on {', '.join(a.input)} ...", file=sys.stderr)
    spm.SentencePieceTrainer.train(
        input=",".join(a.input),
        model_prefix=a.model_prefix,
        vocab_size=a.vocab_size,
        model_type=a.model_type,
        character_coverage=1.0,
        input_sentence_size=a.input_sentence_size,
        shuffle_input_sentence=True,
        # fairseq's dictionary adds its own <s>, <pad>, </s>, <unk>; keep only <unk> in the pieces
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        unk_id=0,
        hard_vocab_limit=False,
        num_threads=2,
        minloglevel=2,
    )
    print(f"sentencepiece model: {a.model_prefix}.model", file=sys.stderr)


def cmd_spm_encode(a):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a.model)
    total = _count_lines(a.input)
    with _open(a.input) as f, _open(a.output, "wt") as out, _bar(total, f"encode {Path(a.input).name}") as bar:
        for line in f:
            out.write(" ".join(sp.encode(line.rstrip("\n"), out_type=str)) + "\n")
            bar.update(1)


def cmd_spm_decode(a):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a.model)
    with _open(a.input) as f, _open(a.output, "wt") as out:
        for line in f:
            out.write(sp.decode(line.split()) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("copy")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--lines", type=int, default=0, help="copy at most this many lines (0 = all)")
    c.add_argument("--start", type=int, default=0)
    c.set_defaults(fn=cmd_copy)
    c = sub.add_parser("sgm2txt")
    c.add_argument("sgm")
    c.add_argument("out")
    c.set_defaults(fn=cmd_sgm2txt)
    c = sub.add_parser("clean")
    for k in ("--src", "--tgt", "--out-src", "--out-tgt"):
        c.add_argument(k, required=True)
    c.add_argument("--min-len", type=int, default=1)
    c.add_argument("--max-len", type=int, default=250)
    c.add_argument("--ratio", type=float, default=1.5)
    c.add_argument("--unescape", action="store_true", help="undo Moses XML escapes (&apos; &quot; &amp; ...)")
    c.add_argument("--dedup", action="store_true")
    c.set_defaults(fn=cmd_clean)
    c = sub.add_parser("spm-train")
    c.add_argument("--input", nargs="+", required=True)
    c.add_argument("--model-prefix", required=True)
    c.add_argument("--vocab-size", type=int, required=True)
    c.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    c.add_argument("--input-sentence-size", type=int, default=2_000_000)
    c.set_defaults(fn=cmd_spm_train)
    for name, fn in (("spm-encode", cmd_spm_encode), ("spm-decode", cmd_spm_decode)):
        c = sub.add_parser(name)
        c.add_argument("--model", required=True)
        c.add_argument("--input", required=True)
        c.add_argument("--output", required=True)
        c.set_defaults(fn=fn)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
