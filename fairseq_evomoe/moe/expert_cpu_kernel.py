"""The experts' CPU compute path: every expert's FFN on its contiguous group of rows, with a
hand-written backward that writes all experts' weight gradients into one [E, ...] tensor."""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .grad_memory import ReusableGradStorage


class ExpertFFNGroups(torch.autograd.Function):
    """Every expert's FFN on its contiguous group of rows, one group at a time (CPU).

    Per group: fc1 with its bias (one addmm), the activation, fc2 with its bias (one addmm), each
    writing into its rows of preallocated outputs. A group's hidden activations ([rows, F]) stay in
    cache from fc1 to fc2, where whole-batch steps would stream [tokens, F] through memory several
    times (bias broadcast, activation, its backward). One [tokens, F] tensor is saved: for ReLU its
    output (applied in place; its derivative is read off the output), for any other activation the
    pre-activation, whose activation the backward recomputes one group at a time (the derivative
    comes from autograd on that group). The backward writes every expert's weight and bias
    gradient straight into one [E, ...] tensor.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, counts: List[int], act, grad_storage: Optional[ReusableGradStorage]):
        hidden = x.new_empty(x.shape[0], w1.shape[1])  # act(fc1(x)) for ReLU, else fc1(x)
        y = x.new_empty(x.shape[0], w2.shape[1])
        for e, (xe, he, ye) in enumerate(zip(x.split(counts), hidden.split(counts), y.split(counts))):
            if xe.shape[0] > 0:
                torch.addmm(b1[e], xe, w1[e].t(), out=he)
                torch.addmm(b2[e], he.relu_() if act is F.relu else act(he), w2[e].t(), out=ye)
        ctx.save_for_backward(x, w1, w2, hidden)
        ctx.counts, ctx.act, ctx.grad_storage = counts, act, grad_storage
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w1, w2, hidden = ctx.saved_tensors
        dx = torch.empty_like(x)
        if ctx.grad_storage is not None:
            dw1, dw2 = ctx.grad_storage.new_like("fc1_weight", w1), ctx.grad_storage.new_like("fc2_weight", w2)
        else:
            dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        db1, db2 = w1.new_empty(w1.shape[:2]), w2.new_empty(w2.shape[:2])
        empty = [e for e, n in enumerate(ctx.counts) if n == 0]  # experts without tokens: zero gradients
        dw1[empty], dw2[empty], db1[empty], db2[empty] = 0, 0, 0, 0
        groups = zip(x.split(ctx.counts), hidden.split(ctx.counts), dy.split(ctx.counts), dx.split(ctx.counts))
        for e, (xe, saved, dye, dxe) in enumerate(groups):
            if xe.shape[0] == 0:
                continue
            he, activation_grad = _activation_with_grad(ctx.act, saved)
            torch.mm(dye.t(), he, out=dw2[e])
            torch.sum(dye, 0, out=db2[e])
            dpe = activation_grad(dye @ w2[e])
            torch.mm(dpe.t(), xe, out=dw1[e])
            torch.sum(dpe, 0, out=db1[e])
            torch.mm(dpe, w1[e], out=dxe)
        return dx, dw1, db1, dw2, db2, None, None, None


def _activation_with_grad(act, saved: Tensor):
    """act(pre) for one group, and the map from d loss / d act(pre) to d loss / d pre, from what
    the forward saved: ReLU's output (pre > 0 exactly where it is > 0), or any other activation's
    input, whose derivative comes from autograd on the group."""
    if act is F.relu:
        return saved, lambda grad_h: torch.ops.aten.threshold_backward(grad_h, saved, 0.0)
    pre = saved
    with torch.enable_grad():
        p = pre.detach().requires_grad_(True)
        h = act(p)
    return h.detach(), lambda grad_h: torch.autograd.grad(h, p, grad_h)[0]
