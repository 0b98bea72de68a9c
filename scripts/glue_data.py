#!/usr/bin/env python3
"""GLUE tasks as fairseq's sentence_prediction task reads them: which TSV columns hold the inputs and
the label, and the tokenisation the pre-trained model's dictionary expects.

    python scripts/glue_data.py extract --task RTE --tsv-dir glue_data --out RAW [--spm-model M | --gpt2-bpe]

writes RAW/{train,valid}.input0 (and .input1 for sentence pairs) and RAW/{train,valid}.label, one
example per line, tokenised; scripts/prepare_glue.sh binarizes them. `valid` is GLUE's dev split
(MNLI: dev_matched), the split GLUE results are usually reported on (its test labels are hidden).

    python scripts/glue_data.py info --task STS-B

prints the task's facts as shell assignments (NUM_CLASSES, METRIC, ...) for the shell scripts.
"""

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple


@dataclass(frozen=True)
class GlueTask:
    inputs: Tuple[int, ...]  # 0-based TSV columns of the input sentence(s)
    label: int  # 0-based column of the label (-1: the last)
    header: bool  # train.tsv / dev.tsv start with a header line
    num_classes: int  # 1 = regression (STS-B)
    metric: str  # acc, f1 (with acc), mcc, pearson_spearman
    dev: str = "dev.tsv"


# Column layout of the GLUE distribution (https://gluebenchmark.com/tasks), as fairseq's
# examples/roberta/preprocess_GLUE_tasks.sh reads it.
TASKS = {
    "CoLA": GlueTask(inputs=(3,), label=1, header=False, num_classes=2, metric="mcc"),
    "SST-2": GlueTask(inputs=(0,), label=1, header=True, num_classes=2, metric="acc"),
    "MRPC": GlueTask(inputs=(3, 4), label=0, header=True, num_classes=2, metric="f1"),
    "QQP": GlueTask(inputs=(3, 4), label=5, header=True, num_classes=2, metric="f1"),
    "STS-B": GlueTask(inputs=(7, 8), label=9, header=True, num_classes=1, metric="pearson_spearman"),
    "MNLI": GlueTask(inputs=(8, 9), label=-1, header=True, num_classes=3, metric="acc", dev="dev_matched.tsv"),
    "QNLI": GlueTask(inputs=(1, 2), label=3, header=True, num_classes=2, metric="acc"),
    "RTE": GlueTask(inputs=(1, 2), label=3, header=True, num_classes=2, metric="acc"),
}


def task_spec(name: str) -> GlueTask:
    if name not in TASKS:
        raise SystemExit(f"--task {name!r} is not a GLUE task this script knows; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def task_folder(tsv_dir: Path, name: str) -> Path:
    """The folder holding the task's train.tsv: <tsv-dir>/<task> (GLUE's layout) or <tsv-dir> itself."""
    for d in (tsv_dir / name, tsv_dir):
        if (d / "train.tsv").is_file():
            return d
    raise SystemExit(f"--tsv-dir {tsv_dir}: no train.tsv in {tsv_dir / name} or {tsv_dir}")


def rows(path: Path, task: GlueTask) -> Iterator[List[str]]:
    """The examples of one TSV file (GLUE's files are not quoted: quotes are text)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.header:
            next(reader, None)
        for n, row in enumerate(reader, start=2 if task.header else 1):
            need = max(max(task.inputs), task.label) + 1
            if len(row) < need:
                raise SystemExit(f"{path}, line {n}: {len(row)} columns, this task needs at least {need}")
            yield row


def tokenizer(spm_model: Optional[str], gpt2_bpe: bool) -> Callable[[str], str]:
    """The pre-training's tokenisation: sentencepiece pieces, GPT-2 BPE ids (RoBERTa's, as fairseq's
    gpt2 encoder writes them), or whitespace-separated words."""
    if spm_model:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=spm_model)
        return lambda text: " ".join(sp.encode(text, out_type=str))
    if gpt2_bpe:
        from fairseq.data.encoders.gpt2_bpe import GPT2BPE, GPT2BPEConfig

        bpe = GPT2BPE(GPT2BPEConfig())  # downloads encoder.json and vocab.bpe on first use
        return bpe.encode
    return lambda text: " ".join(text.split())


def extract(task_name: str, tsv_dir: Path, out: Path, encode: Callable[[str], str]) -> dict:
    """Write the tokenised inputs and the labels of train and dev; returns the example counts."""
    task = task_spec(task_name)
    folder = task_folder(tsv_dir, task_name)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, fname in (("train", "train.tsv"), ("valid", task.dev)):
        path = folder / fname
        if not path.is_file():
            raise SystemExit(f"--tsv-dir: {path} is missing")
        files = [open(out / f"{split}.input{i}", "w", encoding="utf-8") for i in range(len(task.inputs))]
        with open(out / f"{split}.label", "w", encoding="utf-8") as labels:
            n = 0
            for row in rows(path, task):
                for f, col in zip(files, task.inputs):
                    f.write(encode(row[col]) + "\n")
                label = row[task.label].strip()
                if task.num_classes == 1:
                    float(label)  # a regression target must be a number
                labels.write(label + "\n")
                n += 1
        for f in files:
            f.close()
        counts[split] = n
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="TSVs -> tokenised input/label files")
    ex.add_argument("--task", required=True)
    ex.add_argument("--tsv-dir", required=True, type=Path)
    ex.add_argument("--out", required=True, type=Path)
    ex.add_argument("--spm-model", default=None, help="sentencepiece model of the pre-training data")
    ex.add_argument("--gpt2-bpe", action="store_true", help="GPT-2 BPE (the released RoBERTa models' dictionary)")
    info = sub.add_parser("info", help="print the task's facts as shell assignments")
    info.add_argument("--task", required=True)
    a = p.parse_args(argv)
    if a.cmd == "info":
        t = task_spec(a.task)
        print(f"NUM_CLASSES={t.num_classes}\nMETRIC={t.metric}\nPAIR={int(len(t.inputs) == 2)}")
        return 0
    if a.spm_model and a.gpt2_bpe:
        p.error("--spm-model and --gpt2-bpe are alternatives; give one (or neither for whitespace-separated words)")
    counts = extract(a.task, a.tsv_dir, a.out, tokenizer(a.spm_model, a.gpt2_bpe))
    print(f"{a.task}: {counts['train']} train, {counts['valid']} dev examples -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
