#!/usr/bin/env python3
"""Print one field of a fairseq checkpoint's config, e.g. the task it was trained with:

    python scripts/ckpt_info.py CKPT task._name      ->  evomoe_language_modeling

or, with --model-flags, the fairseq-train options that rebuild the checkpoint's model (its
architecture and every model option it was trained with that differs from the option's default,
dropout rates excepted):

    python scripts/ckpt_info.py CKPT --model-flags   ->  --arch, roberta_evomoe_tiny, --moe-expert-count, 8, ...
                                                         (one per line)

fairseq-train builds a model from its command line, not from the checkpoint it restores, so a
fine-tuning run (scripts/finetune_glue.sh) passes these to get the pre-trained model back.
Used by the evaluation scripts so that an EvoMoE checkpoint is evaluated with its own task."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# set by the fine-tuning recipe itself, not carried over from pre-training
NOT_CARRIED = {"dropout", "attention_dropout", "activation_dropout", "pooler_dropout", "max_update"}


def load_config(path: str):
    import torch

    import fairseq_evomoe  # noqa: F401  (allowlists fairseq's checkpoint types for weights_only loading)

    return torch.load(path, map_location="cpu", mmap=True).get("cfg")


def model_flags(model_cfg) -> list:
    """fairseq-train options rebuilding the model of a checkpoint's cfg.model (a Namespace or dict)."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    values = vars(model_cfg) if isinstance(model_cfg, argparse.Namespace) else dict(model_cfg)
    arch = values.get("arch") or values.get("_name")
    if arch not in ARCH_MODEL_REGISTRY:
        sys.exit(f"ckpt_info: the checkpoint's architecture {arch!r} is not registered (is it from another plugin?)")
    parser = argparse.ArgumentParser(add_help=False)
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    flags = ["--arch", arch]
    for action in parser._actions:
        dest, value = action.dest, values.get(action.dest)
        if dest in NOT_CARRIED or value is None or value == action.default or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            flags += [flag] if value else []
        elif isinstance(action, argparse._StoreFalseAction):
            flags += [flag] if not value else []
        else:
            flags += [flag, str(value)]
    return flags


def main():
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, key = sys.argv[1:]
    cfg = load_config(path)
    if key == "--model-flags":
        print("\n".join(model_flags(cfg.get("model"))))  # one word per line (values may hold spaces)
        return
    node = cfg
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        if node is None:
            sys.exit(f"ckpt_info: {path} has no config field {key}")
    print(node)


if __name__ == "__main__":
    main()
