"""A fairseq checkpoint with its task, criterion and the batches of one split, for the scripts that
measure a trained model outside fairseq-train (evaluate_routing.py, spawn_scale.py)."""

import sys
from pathlib import Path
from typing import Iterator, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_checkpoint(path: str, data: str, split: str, gpu: bool = False):
    """(model in eval mode, its MoE layers, task with `split` loaded, criterion)."""
    from fairseq import checkpoint_utils

    import fairseq_evomoe  # noqa: F401  (registers the models; allowlists the checkpoint's types)
    from fairseq_evomoe.moe.layer import moe_layers

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0].eval()
    if gpu:
        model = model.cuda()
    task.load_dataset(split, combine=False, epoch=1)
    return model, moe_layers(model), task, task.build_criterion(cfg.criterion)


def split_batches(task, model, split: str, max_tokens: int, max_batches: int = 0, gpu: bool = False) -> List[dict]:
    """The split's batches in order (the first `max_batches` when > 0), on the GPU with `gpu`."""
    from fairseq import utils

    itr = task.get_batch_iterator(
        dataset=task.dataset(split), max_tokens=max_tokens, max_positions=model.max_positions(),
        ignore_invalid_inputs=True, seed=1, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    out = []
    for sample in itr:
        if max_batches and len(out) >= max_batches:
            break
        out.append(utils.move_to_cuda(sample) if gpu else sample)
    return out
