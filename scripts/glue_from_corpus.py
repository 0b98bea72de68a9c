#!/usr/bin/env python3
"""Small GLUE-format tasks made from the shipped WikiText-2 text, for running the GLUE pipeline
(prepare_glue.sh -> finetune_glue.sh) where GLUE itself cannot be downloaded. They are synthetic
and say nothing about GLUE scores; they exercise the same files, columns and metrics:

  CoLA   single sentence (CoLA's 4 columns, no header): label 1 = a real sentence, 0 = its words
         shuffled                                                  -> Matthews correlation
  MRPC   sentence pair (MRPC's columns): label 1 = the second sentence is the first with one or two
         words deleted, 0 = another sentence                       -> F1, accuracy
  STS-B  sentence pair (STS-B's 10 columns): score 5 x the share of the first sentence's words the
         second keeps (the rest replaced by random words)          -> Pearson, Spearman

    python scripts/glue_from_corpus.py --out-dir DIR [--data-dir ../shared/data] [--train 2000 --dev 300]

writes DIR/<TASK>/train.tsv and dev.tsv (train from WikiText-2's training text, dev from its
validation text), for prepare_glue.sh --tsv-dir DIR."""

import argparse
import gzip
import os
import random
import sys
from pathlib import Path
from typing import List


def sentences(path: Path, limit: int, min_words: int = 6, max_words: int = 30) -> List[List[str]]:
    """Up to `limit` sentences (word lists) of WikiText text, headings skipped, split at ' . '."""
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("="):
                continue
            for s in line.split(" . "):
                words = s.split()
                if min_words <= len(words) <= max_words:
                    out.append(words)
                    if len(out) == limit:
                        return out
    return out


def cola_rows(sents, rng):
    rows = []
    for i, w in enumerate(sents):
        if i % 2:
            w = w[:]
            while w == sents[i]:
                rng.shuffle(w)
        rows.append(["wt2", str(1 - i % 2), "", " ".join(w)])
    return rows


def mrpc_rows(sents, rng):
    rows = [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]]
    for i, w in enumerate(sents):
        if i % 2 == 0:
            drop = set(rng.sample(range(len(w)), rng.choice([1, 2])))
            other = [x for j, x in enumerate(w) if j not in drop]
        else:
            other = sents[(i + 1 + rng.randrange(len(sents) - 1)) % len(sents)]
        rows.append([str(1 - i % 2), str(2 * i), str(2 * i + 1), " ".join(w), " ".join(other)])
    return rows


def stsb_rows(sents, rng, vocab):
    rows = [["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]]
    for i, w in enumerate(sents):
        keep = rng.choice([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
        replaced = set(rng.sample(range(len(w)), round((1 - keep) * len(w))))
        other = [rng.choice(vocab) if j in replaced else x for j, x in enumerate(w)]
        score = 5 * (1 - len(replaced) / len(w))
        rows.append([str(i), "wt2", "wt2", "2016", str(i), "wt2", "wt2", " ".join(w), " ".join(other), f"{score:.3f}"])
    return rows


def write_tsv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write("\t".join(r) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--data-dir", default=os.environ.get("EVOMOE_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                   help="folder holding wikitext-2/ (default: $EVOMOE_DATA or ../shared/data)")
    p.add_argument("--train", type=int, default=2000, help="training examples per task (default 2000)")
    p.add_argument("--dev", type=int, default=300, help="dev examples per task (default 300)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    wt2 = Path(a.data_dir) / "wikitext-2"
    train_file = wt2 / "train.txt.gz" if (wt2 / "train.txt.gz").is_file() else wt2 / "train.txt"
    if not train_file.is_file() or not (wt2 / "valid.txt").is_file():
        p.error(f"--data-dir {a.data_dir}: no wikitext-2/train.txt(.gz) and valid.txt there")
    if a.train < 2 or a.dev < 2:
        p.error("--train and --dev must be at least 2")
    rng = random.Random(a.seed)
    train, dev = sentences(train_file, a.train), sentences(wt2 / "valid.txt", a.dev)
    vocab = sorted({x for w in train for x in w})
    for split, sents in (("train", train), ("dev", dev)):
        write_tsv(a.out_dir / "CoLA" / f"{split}.tsv", cola_rows(sents, rng))
        write_tsv(a.out_dir / "MRPC" / f"{split}.tsv", mrpc_rows(sents, rng))
        write_tsv(a.out_dir / "STS-B" / f"{split}.tsv", stsb_rows(sents, rng, vocab))
    print(f"CoLA, MRPC, STS-B ({len(train)} train, {len(dev)} dev each) -> {a.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
