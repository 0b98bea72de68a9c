#!/usr/bin/env python3
"""Print one field of a fairseq checkpoint's config, e.g. the task it was trained with:

    python scripts/ckpt_info.py CKPT task._name      ->  evomoe_language_modeling

Used by the evaluation scripts so that an EvoMoE checkpoint is evaluated with its own task."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, key = sys.argv[1:]
    import torch

    import fairseq_evomoe  # noqa: F401  (allowlists fairseq's checkpoint types for weights_only loading)

    state = torch.load(path, map_location="cpu", mmap=True)
    node = state.get("cfg")
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        if node is None:
            sys.exit(f"ckpt_info: {path} has no config field {key}")
    print(node)


if __name__ == "__main__":
    main()
