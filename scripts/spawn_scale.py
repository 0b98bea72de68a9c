#!/usr/bin/env python3
"""How much EvoMoE's spawn changes each MoE layer's output, per spawn mode, on real data.

    python scripts/spawn_scale.py DATA-BIN --path CKPT [--split valid] [--max-batches 10] [--json OUT]

CKPT must be an EvoMoE checkpoint written before the spawn (its MoE layers still run the base
expert as a dense FFN), for example the checkpoint at update T_div of a run with absolute phase
lengths (`--evomoe-diversify-updates 100 --max-update 100`). The script records the input of every
MoE layer on the split's first batches, then for each spawn mode spawns a copy of the layer as
training would (the checkpoint's seed and mask ratio) and runs it on the same inputs:

  soft   the routing of the first step after the spawn (the DTS gate at tau_max, Gumbel noise)
  top1   evaluation's routing, argmax(l)

It prints, per mode and layer, the RMS of the layer's output over the base expert's (1 = the spawn
keeps the scale the rest of the network was trained with), over non-padding tokens."""

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # checkpoint_data

MODES = {  # name -> (spawn mode, rescale)
    "mask": ("mask", False),
    "mask-rescale": ("mask", True),
    "reinit": ("reinit", False),
    "noise": ("noise", False),
    "copy": ("copy", False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="binarized data folder of the checkpoint's task")
    p.add_argument("--path", required=True, help="an EvoMoE checkpoint written before the spawn")
    p.add_argument("--split", default="valid", help="split whose batches are used (default valid)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated spawn modes (default {','.join(MODES)})")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    p.add_argument("--max-batches", type=int, default=10, help="batches used (default 10)")
    p.add_argument("--seed", type=int, default=1, help="seed of the Gumbel noise of the soft routing")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    a.modes = [m for m in a.modes.split(",") if m]
    for m in a.modes:
        if m not in MODES:
            p.error(f"--modes: unknown spawn mode {m!r}; choose from {', '.join(MODES)}")
    if not Path(a.path).is_file():
        p.error(f"--path {a.path}: no such checkpoint")
    return a


def layer_inputs(model, layers, samples):
    """Per MoE layer, the (hidden states, token ids) it received on each sample."""
    import torch

    seen = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append((args[0].detach(), mod.routing_tokens)))
             for m in layers]
    try:
        with torch.no_grad():
            for sample in samples:
                model(**sample["net_input"])
    finally:
        for h in hooks:
            h.remove()
    return [seen[id(m)] for m in layers]


def rms_ratio(layer, inputs, base, pad: int) -> float:
    """sqrt(sum ||y||^2 / sum ||y_base||^2) over the non-padding tokens of `inputs`."""
    import torch

    num = den = 0.0
    with torch.no_grad():
        for (x, ids), y_base in zip(inputs, base):
            real = (ids.transpose(0, 1) != pad).unsqueeze(-1) if ids is not None else torch.ones_like(x[..., :1], dtype=torch.bool)
            y = layer(x, ids)
            num += float((y.float() * real).pow(2).sum())
            den += float((y_base.float() * real).pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


def measure(a: argparse.Namespace) -> dict:
    import torch

    from checkpoint_data import load_checkpoint, split_batches
    from fairseq_evomoe.evomoe.expert_diversify import DiversifyingMoELayer
    from fairseq_evomoe.evomoe.spawn import SpawnSettings

    model, layers, task, _ = load_checkpoint(a.path, a.data, a.split)
    if not layers or not all(isinstance(m, DiversifyingMoELayer) and not m.is_spawned for m in layers):
        sys.exit(f"spawn_scale: {a.path} is not an EvoMoE checkpoint from before the spawn "
                 "(its MoE layers must still run the base expert; see --help)")
    samples = split_batches(task, model, a.split, a.max_tokens, a.max_batches)
    inputs = layer_inputs(model, layers, samples)
    pad = task.source_dictionary.pad()
    result = {"checkpoint": str(Path(a.path).resolve()), "split": a.split, "batches": len(samples),
              "layers": [m.layer_name for m in layers], "modes": {}}
    for name in a.modes:
        mode, rescale = MODES[name]
        per_layer = {"soft": [], "top1": []}
        for m, ins in zip(layers, inputs):
            with torch.no_grad():
                base = [m(x, ids) for x, ids in ins]
            spawned = copy.deepcopy(m)
            spawned.plan = replace(m.plan, spawn=SpawnSettings(mode, m.plan.spawn.mask_ratio, rescale,
                                                                 m.plan.spawn.noise_scale, m.plan.spawn.seed))
            spawned.spawn()
            spawned.gate.set_num_updates(int(m.spawn_update))  # the first step after the spawn: soft, tau_max
            spawned.train()
            spawned.experts.eval()  # no activation dropout inside the experts
            torch.manual_seed(a.seed)
            per_layer["soft"].append(rms_ratio(spawned, ins, base, pad))
            spawned.eval()
            per_layer["top1"].append(rms_ratio(spawned, ins, base, pad))
        result["modes"][name] = per_layer
    return result


def main(argv=None) -> None:
    a = parse_args(argv)
    r = measure(a)
    print(f"{a.path}: RMS of each MoE layer's output over the base expert's ({r['batches']} {a.split} batches)")
    print(f"{'mode':<14} {'routing':<6} " + " ".join(f"{n:>10}" for n in r["layers"]))
    for name, per_layer in r["modes"].items():
        for routing, ratios in per_layer.items():
            print(f"{name:<14} {routing:<6} " + " ".join(f"{v:>10.3f}" for v in ratios))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
