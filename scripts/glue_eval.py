#!/usr/bin/env python3
"""The GLUE metric of a fine-tuned RoBERTa(-MoE) checkpoint on a task's dev split (`valid`):

    python scripts/glue_eval.py --task MRPC --data MRPC-bin --checkpoint ckpt/checkpoint_best.pt [--cpu]

prints one line (`MRPC dev: f1 88.10, acc 83.33 (408 examples)`) and, with --json FILE, writes
the numbers. Metrics are the task's own: Matthews correlation for CoLA, F1 (and accuracy) for MRPC
and QQP, Pearson and Spearman correlation for STS-B, accuracy otherwise; all x 100. Predictions
use the model's routing at evaluation (EvoMoE: the phase its layers reached)."""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue_data import task_spec  # noqa: E402


def glue_metrics(metric: str, preds: Sequence, labels: Sequence) -> Dict[str, float]:
    """The task's metrics (x 100) from predictions and gold labels: class labels as strings (F1
    counts "1" as the positive class, as GLUE does) or regression values."""
    if metric == "pearson_spearman":
        from scipy.stats import pearsonr, spearmanr

        p, g = np.asarray(preds, dtype=float), np.asarray(labels, dtype=float)
        return {"pearson": 100 * float(pearsonr(p, g)[0]), "spearman": 100 * float(spearmanr(p, g)[0])}
    from sklearn.metrics import f1_score, matthews_corrcoef

    p, g = np.asarray(preds), np.asarray(labels)
    out = {"acc": 100 * float((p == g).mean())}
    if metric == "mcc":
        out = {"mcc": 100 * float(matthews_corrcoef(g, p)), **out}
    elif metric == "f1":
        out = {"f1": 100 * float(f1_score(g, p, pos_label="1")), **out}
    return out


def predict(task, model, split: str, head: str, regression: bool, use_cuda: bool) -> (List, List):
    """(predictions, gold labels) over one split, in its order; class labels as strings."""
    import torch
    from fairseq import utils

    task.load_dataset(split)
    dataset = task.dataset(split)
    itr = task.get_batch_iterator(dataset, max_sentences=32, max_positions=task.max_positions(),
                                  ignore_invalid_inputs=False).next_epoch_itr(shuffle=False)
    labels = task.label_dictionary if not regression else None
    preds, gold = [], []
    with torch.no_grad():
        for sample in itr:
            if use_cuda:
                sample = utils.move_to_cuda(sample)
            logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=head)
            target = model.get_targets(sample, [logits]).view(-1)
            if regression:
                preds += logits.view(-1).float().tolist()
                gold += target.float().tolist()
            else:
                preds += [labels[i + labels.nspecial] for i in logits.argmax(-1).tolist()]
                gold += [labels[i + labels.nspecial] for i in target.tolist()]
    return preds, gold


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="GLUE task name (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE)")
    p.add_argument("--data", required=True, help="the task's binarized folder (prepare_glue.sh's <TASK>-bin)")
    p.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint")
    p.add_argument("--head", default="sentence_classification_head", help="classification head name")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    a = p.parse_args(argv)
    spec = task_spec(a.task)
    for path, opt in ((a.data, "--data"), (a.checkpoint, "--checkpoint")):
        if not Path(path).exists():
            p.error(f"{opt} {path} does not exist")

    import torch
    from fairseq import checkpoint_utils

    import fairseq_evomoe  # noqa: F401  (registers the MoE models; allowlists fairseq's checkpoint types)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([a.checkpoint], arg_overrides={"data": a.data})
    model = models[0].eval()
    use_cuda = torch.cuda.is_available() and not a.cpu
    if use_cuda:
        model.cuda()
    regression = spec.num_classes == 1
    preds, gold = predict(task, model, "valid", a.head, regression, use_cuda)
    result = glue_metrics(spec.metric, preds, gold)
    result["examples"] = len(gold)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "examples")
    print(f"{a.task} dev: {shown} ({len(gold)} examples)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
