"""What an optimizer steps for a model parameter: the parameter itself, or fairseq's fp32 master
copy of it (per parameter, or a slice of one flat tensor), and the state tensors of that copy."""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside fairseq's optimizer wrappers (each exposes it as `.optimizer`)."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


@dataclass
class SteppedCopy:
    """What the optimizer steps for one model parameter: `master` (the parameter itself, or its fp32
    master copy or a view into fairseq's flat master copy) and its state tensors of the same shape.
    `key` is the state's own key when the parameter has one to itself, else None (flat copies)."""

    master: torch.Tensor
    state: Dict[str, torch.Tensor]
    key: Optional[torch.Tensor]


def stepped_copies(optimizer, params: List[torch.Tensor]) -> Optional[List[SteppedCopy]]:
    """SteppedCopy of each of `params`: the parameters themselves for optimizers that step the
    model's parameters (fp32, --amp, --memory-efficient-fp16/bf16), the fp32 master copies for
    fairseq's FP16Optimizer (--fp16/--bf16: per parameter, or slices of one flat tensor per device).
    None for an optimizer laid out otherwise."""
    opt = torch_optimizer(optimizer)
    stepped = {id(p) for group in opt.param_groups for p in group["params"]}
    if all(id(p) in stepped for p in params):
        return [SteppedCopy(p.data, _same_shape(opt.state.get(p, {}), p, slice(None)), p) for p in params]
    fp16, fp32 = getattr(optimizer, "fp16_params", None), getattr(optimizer, "fp32_params", None)
    if fp16 is None or fp32 is None:
        return None
    if isinstance(fp32, dict):  # flat: each device's parameters laid end to end, in fp16_params order
        where, offsets = {}, {}
        for q in fp16:
            start = offsets.get(q.device.index, 0)
            where[id(q)] = (fp32[q.device.index], slice(start, start + q.numel()))
            offsets[q.device.index] = start + q.numel()
        copies = []
        for p in params:
            flat, span = where[id(p)]
            state = _same_shape(opt.state.get(flat, {}), flat, span)
            copies.append(SteppedCopy(flat.data[span].view_as(p), {k: v.view_as(p) for k, v in state.items()}, None))
        return copies
    index = {id(q): i for i, q in enumerate(fp16)}
    masters = [fp32[index[id(p)]] for p in params]
    return [SteppedCopy(m.data, _same_shape(opt.state.get(m, {}), m, slice(None)), m) for m in masters]


def _same_shape(state: dict, param: torch.Tensor, span: slice) -> Dict[str, torch.Tensor]:
    """The state tensors shaped like the parameter (Adam's moments; not its step count), sliced."""
    return {k: v[span] for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}
