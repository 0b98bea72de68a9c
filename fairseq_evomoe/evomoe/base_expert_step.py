"""Expert-diversify: the optimizer steps the base expert alone.

Before the spawn, an MoE layer trains one base expert: slot 0 of its [E, ...] expert parameters.
The other E - 1 slots get zero gradients, and the spawn overwrites them (weights and optimizer
state alike, spawn.py). Stepping them anyway costs E times the base expert's optimizer work:
fairseq's Adam makes about ten passes over each weight and its two moments and allocates an
E-sized temporary.

`base_expert_only` shows the optimizer slot 0 alone for the length of one step. The tensors it
steps, their gradients and their per-expert state (every state tensor whose first dimension is E:
Adam's moments, Adafactor's factored second moments) become views of slot 0. Afterwards the full
tensors are put back, so nothing outside the step ever sees a narrowed parameter. State the step
created (the first step's moments) is widened to E slots with zeros in the others, which is what
stepping all E slots with their zero gradients leaves there. For Adam this changes nothing but the
time: slot 0 gets exactly the same update. Optimizers that look at whole tensors (Adafactor's
parameter RMS, LAMB's trust ratio) now see the base expert alone, as they would see a dense FFN,
where before the untrained slots entered those norms.

Under --fp16 --fp16-no-flatten-grads the fp32 master copies are narrowed with the model's
parameters, so the copy back into the model writes slot 0 only. fairseq's flat master copy (plain
--fp16, one tensor for all parameters) has no per-parameter tensor to narrow, and there all E slots
are stepped, as before.
"""

from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

from ..moe.parallel.optimizer_state import keep_local_slices
from .expert_diversify import DiversifyingMoELayer
from .stepped_copies import stepped_copies, torch_optimizer

# what narrowing a tensor saved: its full data, its full gradient, its full per-expert state, and
# the keys its state had before the step
_Saved = Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor], Set[str]]


def _per_expert(v, num_experts: int) -> bool:
    return torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == num_experts


def _steppable_alone(t: torch.Tensor, state: Optional[dict]) -> bool:
    """Whether slot 0 of `t` can be stepped alone: every state tensor must tell whether it is per
    expert (first dimension E, or 1 while narrowed). Moments shaped like `t` always do. Other
    shapes (Adafactor's factored second moments: for a [E, F] bias, a [E] row and a [F] column
    statistic) are ambiguous when E, or 1, is also the size of another axis of `t`; such a tensor is
    stepped whole, as before."""
    if state and all(not torch.is_tensor(v) or v.dim() == 0 or v.shape == t.shape for v in state.values()):
        return True
    return t.shape[0] not in t.shape[1:] and 1 not in t.shape[1:]


def _narrow(t: torch.Tensor, state: Optional[dict]) -> _Saved:
    full, grad = t.data, t.grad
    views = {}
    if state:
        views = {k: v for k, v in state.items() if _per_expert(v, full.shape[0])}
        for k, v in views.items():
            state[k] = v[:1]
    t.data = full[:1]
    if grad is not None:
        t.grad = grad[:1]
    return full, grad, views, set(state or ())


def _widen(t: torch.Tensor, state: Optional[dict], saved: _Saved) -> None:
    full, grad, views, existing = saved
    t.data = full
    t.grad = grad
    if not state:
        return
    for k, v in list(state.items()):
        if k in views:
            if v.data_ptr() != views[k].data_ptr():
                views[k][:1].copy_(v)  # the step replaced the view by a new tensor
            state[k] = views[k]
        elif k not in existing and _per_expert(v, 1):
            wide = v.new_zeros((full.shape[0],) + v.shape[1:])  # created by this step: zeros elsewhere
            wide[:1].copy_(v)
            state[k] = wide


@contextmanager
def base_expert_only(optimizer, layers: Iterable[DiversifyingMoELayer]):
    """Within: `optimizer` (a fairseq optimizer) steps only slot 0 of the expert parameters of the
    layers still in the expert-diversify phase. A no-op where there are none, or where the optimizer
    steps one flat master copy."""
    params = [p for m in layers if not m.is_spawned for p in m.experts.parameters() if p.shape[0] > 1]
    copies = stepped_copies(optimizer, params) if params else None
    if not copies or any(c.key is None for c in copies):
        yield
        return
    opt = torch_optimizer(optimizer)
    keep_local_slices(opt, params)
    alone = [(p, c) for p, c in zip(params, copies) if _steppable_alone(c.key, opt.state.get(c.key))]
    # the stepped tensors (parameters or their fp32 masters), then the model's own where they differ
    narrowed: List[Tuple[torch.Tensor, Optional[dict]]] = [(c.key, opt.state.get(c.key)) for _, c in alone]
    narrowed += [(p, None) for p, c in alone if c.key is not p]
    saved = [_narrow(t, state) for t, state in narrowed]
    try:
        yield
    finally:
        for (t, _), s in zip(narrowed, saved):
            _widen(t, opt.state.get(t), s)
