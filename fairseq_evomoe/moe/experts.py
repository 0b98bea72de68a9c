"""Expert FFNs stored as batched weights, and the choice of the path that computes them.

Each expert is fairseq's FFN: fc2(dropout(act(fc1(x)))). The weights of all local experts live in
one tensor per projection (fc1_weight: [E, F, M], like nn.Linear's [out, in]), so an optimizer
sees four parameters per layer whatever E is, and a checkpoint stores them compactly.

The parameters are tagged `p.expert` only under expert parallelism (moe/parallel/sharding.py):
fairseq's data-parallel wrappers then leave them out of the all-reduce, and the gradient norm
counts each expert once across workers (moe/parallel/grad_norm.py). In one process they are
ordinary parameters.

The expert-sorted tokens form contiguous groups, one per expert, followed by rows of no expert
(assignments not kept), whose output is 0. On the CPU the group sizes are read on the host (the data
is there: nothing to wait for) and the groups computed exactly as they are; off the CPU
(`static_shapes`) no path reads them on the host, except a dropless layer without grouped_mm, which
reads the largest group once. The paths:

- CPU (without activation dropout): expert_cpu_kernel.py, one group at a time with a
  hand-written backward that writes every expert's gradient into one [E, ...] tensor, whose
  memory it reuses from step to step (grad_memory.py). It computes no padding rows and keeps the
  losses of earlier commits to the last bit.
- torch's grouped matmul (expert_grouped_mm.py), where `grouped_mm_preferred` says so: on a GPU
  where it has a fast kernel or many experts, and on the CPU with activation dropout. Group
  offsets on the device.
- batched (expert_batched.py) everywhere else: one batched matmul per projection over
  [E, max_rows, M] slots. max_rows is the capacity where the layer has one (no host read), else
  the largest group (one host read per layer).

`--moe-expert-dtype bf16` runs the experts alone in bfloat16 (`compute_dtype`), with
differentiable casts in and out.
"""

import functools
import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .expert_batched import batched_ffn
from .expert_cpu_kernel import ExpertFFNGroups
from .expert_grouped_mm import Counts, grouped_ffn, grouped_mm_preferred, matmul_dtype
from .grad_memory import ReusableGradStorage

# the parameters of ExpertFFNs, each [E, ...] (expert parallelism slices, gathers and tags them)
EXPERT_PARAM_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")

# --moe-expert-dtype: the dtype the experts compute in (None: the model's, or autocast's)
EXPERT_DTYPES = {"auto": None, "bf16": torch.bfloat16}


def _host(counts: Counts) -> List[int]:
    return counts.tolist() if isinstance(counts, Tensor) else list(counts)


def _without_rows(x: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Zeros of x's shape for rows that no expert computes, with every parameter, and x itself, in
    the graph so that gradients exist (zeros): under expert parallelism x is what this worker
    received, and its backward is the exchange's, which every worker must take part in."""
    return x.new_zeros(x.shape) + 0.0 * (sum(p.sum() for p in params).to(x.dtype) + x.sum())


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
        # group sizes left on the device (True) or read on the host (False); None: on the host on the CPU only
        self.static_shapes: Optional[bool] = None
        # the path with static shapes: None (chosen as in the module docstring), "grouped_mm" or "batched"
        self.static_path: Optional[str] = None
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
        return params if params is not None else tuple(getattr(self, n) for n in EXPERT_PARAM_NAMES)

    def _needs_cast(self, x: Tensor) -> bool:
        return self.compute_dtype is not None and x.dtype != self.compute_dtype

    def _in_compute_dtype(self, x: Tensor, params: Optional[Sequence[Tensor]], run) -> Tensor:
        """run(x, params) with x and the weights cast to the compute dtype (--moe-expert-dtype bf16;
        differentiable casts, so the gradients reach the weights in their own dtype), its result
        cast to the dtype the experts would otherwise give (the model's, or autocast's)."""
        dtype, out_dtype = self.compute_dtype, matmul_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return run(x.to(dtype), [t.to(dtype) for t in self._params(params)]).to(out_dtype)

    def forward(self, x: Tensor, counts: Counts, params: Optional[Sequence[Tensor]] = None,
                max_rows: Optional[int] = None) -> Tensor:
        """x: [P, M] tokens grouped by expert (counts[e] rows for expert e), then P - sum(counts)
        rows of no expert, whose output is 0.

        counts: a LongTensor [E] or a list of ints; max_rows: a bound on every counts[e] known on
        the host (None: none), for the batched path.
        params: (fc1_weight, fc1_bias, fc2_weight, fc2_bias) to use instead of the module's own, as
        expert parallelism passes them (the same tensors behind an identity with a custom backward)."""
        assert len(counts) == self.num_experts, (len(counts), self.num_experts)
        if self._needs_cast(x):
            return self._in_compute_dtype(x, params, lambda xc, pc: self.forward(xc, counts, pc, max_rows))
        params = self._params(params)
        if x.shape[0] == 0:
            return _without_rows(x, params)
        static = self.static_shapes if self.static_shapes is not None else x.device.type != "cpu"
        if not static:
            return self._host_sized_forward(x, _host(counts), params)
        path = self.static_path or ("grouped_mm" if grouped_mm_preferred(x, self.num_experts) else "batched")
        if path == "grouped_mm":
            return self.grouped_forward(x, counts, params)
        if max_rows is None:  # dropless: the largest group, where counts are on the device the one host read
            max_rows = max(int(counts.max()) if isinstance(counts, Tensor) else max(counts), 1)
        counts = counts if isinstance(counts, Tensor) else torch.tensor(counts, device=x.device)
        return self.batched_forward(x, counts, max_rows, params)

    def _host_sized_forward(self, x: Tensor, counts: List[int], params: Sequence[Tensor]) -> Tensor:
        """The groups with their sizes on the host: exactly the sum(counts) grouped rows are
        computed (the rows after them output 0)."""
        rows, grouped = x.shape[0], sum(counts)
        if grouped == 0:
            return _without_rows(x, params)
        x = x[:grouped]
        if x.device.type == "cpu" and not (self.training and self.activation_dropout > 0):
            y = ExpertFFNGroups.apply(x, *params, counts, self.activation_fn, self.grad_storage)
        elif grouped_mm_preferred(x, self.num_experts):
            y = self.grouped_forward(x, counts, params)
        else:
            y = self.batched_forward(x, torch.tensor(counts, device=x.device), max(counts), params)
        return y if grouped == rows else F.pad(y, (0, 0, 0, rows - grouped))

    def _dropout(self):
        return functools.partial(F.dropout, p=self.activation_dropout, training=self.training)

    def grouped_forward(self, x: Tensor, counts: Counts, params: Optional[Sequence[Tensor]] = None) -> Tensor:
        """torch's grouped matmul (expert_grouped_mm.py) over all experts at once; params as in forward."""
        return grouped_ffn(x, counts, self._params(params), self.activation_fn, self._dropout())

    def batched_forward(self, x: Tensor, counts: Tensor, max_rows: int, params: Sequence[Tensor]) -> Tensor:
        """One batched matmul per projection over [E, max_rows] slots (expert_batched.py)."""
        return batched_ffn(x, counts, max_rows, params, self.activation_fn, self._dropout())

    def forward_one(self, x: Tensor, expert: int, params: Optional[Sequence[Tensor]] = None) -> Tensor:
        """One expert on all of x (an expert run as a dense FFN, and tests); params as
        in forward."""
        if self._needs_cast(x):
            return self._in_compute_dtype(x, params, lambda xc, pc: self.forward_one(xc, expert, pc))
        return self.expert_forward(x, *(t[expert] for t in self._params(params)))
