"""Expert FFNs stored as batched weights and computed as one grouped matmul.

Each expert is fairseq's FFN: fc2(dropout(act(fc1(x)))). The weights of all local experts live in
one tensor per projection (fc1_weight: [E, F, M], like nn.Linear's [out, in]), so an optimizer
sees four parameters per layer whatever E is, and a checkpoint stores them compactly.

The parameters are tagged `p.expert` only under expert parallelism (moe/parallel.py): fairseq's
data-parallel wrappers then leave them out of the all-reduce, and the gradient norm counts each
expert once across workers (moe/expert_optimizer.py). In one process they are ordinary parameters.

The expert-sorted tokens form contiguous groups, one per expert. Three ways to compute them:

- CPU: `_ExpertFFNGroups`, one group at a time with the biases fused into the matmuls and a
  hand-written backward that writes every expert's gradient into one [E, ...] tensor, whose memory
  it reuses from step to step (`ReusableGradStorage`); faster than torch's grouped_mm on CPU in
  every interleaved A/B we ran (README, Benchmarks).
- GPU (`grouped_mm_preferred`: bf16 on Hopper and newer, other dtypes from 16 experts up), and CPU
  with activation dropout (the per-group path has no dropout): torch's grouped matmul
  (`torch.nn.functional.grouped_mm`), one call per projection over all groups. It reads the group
  sizes on the device, so nothing in it waits for the GPU.
- Elsewhere: a loop over the groups with the weights split by
  `unbind`, whose backward stacks the per-expert gradients into one tensor; indexing `W[e]` per
  expert would instead allocate and add a full-size gradient for every expert (E times the memory
  traffic).
"""

import functools
import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Counts = Union[Tensor, Sequence[int]]  # rows per expert

# --moe-expert-dtype: the dtype the experts compute in (None: the model's, or autocast's)
EXPERT_DTYPES = {"auto": None, "bf16": torch.bfloat16}


def _host(counts: Counts) -> List[int]:
    return counts.tolist() if isinstance(counts, Tensor) else list(counts)


class _AddGroupBias(torch.autograd.Function):
    """h[rows of expert e] += bias[e], in place; the bias gradient is a sum of rows per group (a
    gather with index_select would make its backward a [tokens x width] scatter-add)."""

    @staticmethod
    def forward(ctx, h: Tensor, bias: Tensor, expert_of_row: Tensor):
        ctx.save_for_backward(expert_of_row)
        ctx.num_experts = bias.shape[0]
        ctx.mark_dirty(h)
        return h.add_(bias.index_select(0, expert_of_row))

    @staticmethod
    def backward(ctx, grad: Tensor):
        expert_of_row, = ctx.saved_tensors
        grad = grad.contiguous()  # grouped_mm's backward rejects broadcast gradients (e.g. of y.sum())
        return grad, group_sums(grad, expert_of_row, ctx.num_experts), None


def group_sums(t: Tensor, group_of_row: Tensor, num_groups: int) -> Tensor:
    """[G, N]: the sum of t's rows per group, for rows sorted by group (group_of_row
    non-decreasing). Deterministic, with fp32 accumulation as torch.sum. On a GPU one matmul
    against the one-hot group matrix, where a sum per group would launch G kernels; on the CPU
    the sum per group, where the matmul would cost G times the arithmetic."""
    if t.device.type == "cpu":
        counts = torch.bincount(group_of_row, minlength=num_groups).tolist()
        return torch.stack([g.sum(0) for g in t.split(counts)])
    one_hot = group_of_row.unsqueeze(0) == torch.arange(num_groups, device=t.device).unsqueeze(1)
    return one_hot.to(t.dtype) @ t


class ReusableGradStorage:
    """Reuses the memory of the experts' weight gradients from one backward to the next (CPU).

    An expert weight gradient is E times a dense layer's, and fairseq frees it after every step
    (`zero_grad` sets `p.grad = None`). glibc serves allocations that large with a fresh mmap, so
    every backward faulted in and zeroed all of those pages again: 13-22% of the time of a step at 16
    experts and 4,096 tokens (README, Benchmarks). This keeps the last storage handed out and hands it out
    again only when nothing else refers to it any more, the same test torch's autograd applies
    before it accumulates into a gradient in place; a gradient still held anywhere (as `p.grad`
    during gradient accumulation, or kept by the caller) is never written to. The price is that the
    memory stays allocated between steps instead of only during them.

    Owned by one ExpertFFNs module; copies of the module start empty.
    """

    def __init__(self):
        self._kept: Dict[str, Tensor] = {}
        self._zero_slots: Dict[str, set] = {}  # slots of a kept tensor that the last backward left at 0

    def new_like(self, name: str, like: Tensor) -> Tensor:
        kept = self._kept.get(name)
        if (
            kept is not None
            and kept.shape == like.shape
            and kept.dtype == like.dtype
            and kept.device == like.device
            and self._only_holder(kept)
        ):
            return kept.detach()  # a new tensor on the same storage, so that autograd can adopt it
        self._kept[name] = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._zero_slots[name] = set()
        return self._kept[name].detach()

    def zero_slots(self, name: str, grad: Tensor, slots: List[int]) -> None:
        """grad[e] = 0 for the experts e in `slots` (those without tokens), skipping the ones that
        are still 0 from the last backward: a gradient is only ever scaled in place once handed
        out (clipping, loss scaling, all-reduce of zeros), so its zeros stay zeros. In the
        expert-diversify phase only the base expert has tokens, and this saves writing E - 1
        zero slots per weight every step."""
        known = self._zero_slots.get(name, set())
        for e in slots:
            if e not in known:
                grad[e].zero_()
        self._zero_slots[name] = set(slots)

    @staticmethod
    def _only_holder(t: Tensor) -> bool:
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if use_count is None:  # a torch without the counter: never reuse
            return False
        storage = t.untyped_storage()  # this Python handle counts as one holder, `t` as the other
        return use_count(storage._cdata) <= 2

    def __deepcopy__(self, memo):
        return ReusableGradStorage()

    def __getstate__(self):
        return {"_kept": {}, "_zero_slots": {}}


class _ExpertFFNGroups(torch.autograd.Function):
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
        for name, g in (("fc1_weight", dw1), ("fc2_weight", dw2)):
            if ctx.grad_storage is not None:
                ctx.grad_storage.zero_slots(name, g, empty)
            else:
                g[empty] = 0
        db1[empty], db2[empty] = 0, 0
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


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's (fairseq's --amp) where it is on, else x's own.
    torch.nn.functional.grouped_mm has no autocast rule, so the grouped path casts to it itself."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def grouped_mm_supported(x: Tensor) -> bool:
    """Whether torch.nn.functional.grouped_mm (torch >= 2.9) runs on x's device and dtype: always on
    the CPU; on a GPU, tried once per device and dtype (torch has a CUTLASS kernel for bf16 on Hopper
    and newer, and, in recent versions, a slower fallback for other dtypes and GPUs)."""
    if not hasattr(F, "grouped_mm"):
        return False
    return x.device.type == "cpu" or _grouped_mm_runs(x.device, matmul_dtype(x))


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a, b = torch.zeros(16, 16, device=device, dtype=dtype), torch.zeros(2, 16, 16, device=device, dtype=dtype)
        F.grouped_mm(a, b, offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def grouped_mm_preferred(x: Tensor, num_experts: int) -> bool:
    """The GPU path: torch's grouped matmul where it has its fast kernel (bf16 on Hopper and
    newer); elsewhere its fallback kernel from 16 experts up, and below that a loop over the
    experts. Measured on an H100 (fwd+bwd, dim 512 / FFN 2048, README, Benchmarks): in fp16 the
    fallback took 0.54-0.61x the loop's time at 64 experts and 0.82-0.99x at 16, but 1.09-1.34x
    at 4; fp32 alike."""
    if not grouped_mm_supported(x):
        return False
    if x.device.type == "cpu":
        return True
    if matmul_dtype(x) == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9:
        return True
    return num_experts >= 16


class ExpertFFNs(nn.Module):
    def __init__(
        self,
        num_experts: int,
        model_dim: int,
        ffn_dim: int,
        activation_fn: Callable[[Tensor], Tensor],
        activation_dropout: float = 0.0,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.compute_dtype = compute_dtype  # None: the input's dtype (or autocast's); see _in_compute_dtype
        self.num_experts = num_experts
        self.model_dim = model_dim
        self.ffn_dim = ffn_dim
        self.activation_fn = activation_fn
        self.activation_dropout = activation_dropout
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, ffn_dim, model_dim))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, model_dim, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, model_dim))
        self.grad_storage = ReusableGradStorage()
        self.reset_parameters()

    def reset_parameters(self, std: Optional[float] = None, generator: Optional[torch.Generator] = None):
        """nn.Linear's default init per expert, or normal(0, std) with zero bias (BERT-style)."""
        def draw(t, fill):  # on the CPU (generators are per device), then moved
            t.copy_(fill(torch.empty(t.shape, dtype=torch.float32)))

        with torch.no_grad():
            for w, b in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
                if std is not None:
                    draw(w, lambda t: t.normal_(0.0, std, generator=generator))
                    b.zero_()
                else:
                    bound = 1.0 / math.sqrt(w.shape[-1])
                    draw(w, lambda t: t.uniform_(-bound, bound, generator=generator))
                    draw(b, lambda t: t.uniform_(-bound, bound, generator=generator))

    def expert_forward(self, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        h = self.activation_fn(F.linear(x, w1, b1))
        h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return F.linear(h, w2, b2)

    def _params(self, params: Optional[Sequence[Tensor]]) -> Sequence[Tensor]:
        return params if params is not None else (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)

    def _needs_cast(self, x: Tensor) -> bool:
        return self.compute_dtype is not None and x.dtype != self.compute_dtype

    def _in_compute_dtype(self, x: Tensor, params: Optional[Sequence[Tensor]], run) -> Tensor:
        """run(x, params) with x and the weights cast to the compute dtype (--moe-expert-dtype bf16;
        differentiable casts, so the gradients reach the weights in their own dtype), its result
        cast to the dtype the experts would otherwise give (the model's, or autocast's)."""
        dtype, out_dtype = self.compute_dtype, matmul_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return run(x.to(dtype), [t.to(dtype) for t in self._params(params)]).to(out_dtype)

    def forward(self, x: Tensor, counts: Counts, params: Optional[Sequence[Tensor]] = None) -> Tensor:
        """x: [sum(counts), M] tokens grouped by expert (counts[e] rows for expert e).

        counts: a LongTensor [E] or a list of ints. The grouped path on a GPU reads a tensor on
        the GPU, so the host need not wait for the routing; the other paths read the list.
        params: (fc1_weight, fc1_bias, fc2_weight, fc2_bias) to use instead of the module's own, as
        expert parallelism passes them (the same tensors behind an identity with a custom backward)."""
        assert len(counts) == self.num_experts, (len(counts), self.num_experts)
        if self._needs_cast(x):
            return self._in_compute_dtype(x, params, lambda xc, pc: self.forward(xc, counts, pc))
        w1, b1, w2, b2 = self._params(params)
        if x.shape[0] == 0:
            # keep every parameter in the graph so that gradients exist (zeros)
            return x + 0.0 * sum(p.sum() for p in (w1, b1, w2, b2)).to(x.dtype)
        if x.device.type == "cpu" and not (self.training and self.activation_dropout > 0):
            return _ExpertFFNGroups.apply(x, w1, b1, w2, b2, _host(counts), self.activation_fn, self.grad_storage)
        if grouped_mm_preferred(x, self.num_experts):
            return self.grouped_forward(x, counts, (w1, b1, w2, b2))
        params = zip(w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0))
        outs = [self.expert_forward(xe, *p) for xe, p in zip(x.split(_host(counts)), params) if xe.shape[0] > 0]
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]

    def grouped_forward(self, x: Tensor, counts: Counts, params: Optional[Sequence[Tensor]] = None) -> Tensor:
        """Both projections as single grouped matmuls over contiguous groups (torch's grouped_mm),
        with no host sync: group offsets and the expert of each row are computed on x's device."""
        w1, b1, w2, b2 = self._params(params)
        dtype = matmul_dtype(x)
        if x.dtype != dtype:  # under autocast: the weights' casts are differentiable, as autocast's are
            x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
        sizes = counts.to(x.device) if isinstance(counts, Tensor) else torch.tensor(counts, device=x.device)
        offsets = torch.cumsum(sizes, 0, dtype=torch.int32)
        experts = torch.arange(self.num_experts, device=x.device)
        expert_of_row = torch.repeat_interleave(experts, sizes, output_size=x.shape[0])
        h = F.grouped_mm(x, w1.transpose(1, 2), offs=offsets)
        h = _AddGroupBias.apply(h, b1, expert_of_row)
        h = F.dropout(self.activation_fn(h), p=self.activation_dropout, training=self.training)
        y = F.grouped_mm(h, w2.transpose(1, 2), offs=offsets)
        return _AddGroupBias.apply(y, b2, expert_of_row)

    def forward_one(self, x: Tensor, expert: int, params: Optional[Sequence[Tensor]] = None) -> Tensor:
        """One expert on all of x (the dense FFN of the expert-diversify phase, and tests); params as
        in forward."""
        if self._needs_cast(x):
            return self._in_compute_dtype(x, params, lambda xc, pc: self.forward_one(xc, expert, pc))
        return self.expert_forward(x, *(t[expert] for t in self._params(params)))
