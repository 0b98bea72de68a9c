"""fairseq's mixed-precision optimizers under expert parallelism (installed by fairseq_evomoe/patches.py).

--bf16, and --fp16 with --fp16-no-flatten-grads (FP16Optimizer): the optimizer steps fp32 master copies
of the parameters. fairseq copies a parameter's `expert` tag to its master but not what expert
parallelism needs, so the gradient norm would leave the experts out and checkpoints would hold each
worker's own experts only. `copying_expert_tags` copies `expert_parallel` (optimizer_state.py) to
the masters and links each expert master to its parameter (`master_of`), whose
`expert_grad_copies` (grad_norm.py) each forward sets (fairseq builds the optimizer before the
first forward, and the count changes at an EvoMoE spawn): the norm counts every expert once and the
saved optimizer state is complete. With fairseq's flat master copy (the default) the experts are
mixed into one tensor per worker; plain --fp16 is refused before training (models/model_checks.py).

--amp (AMPOptimizer): torch's GradScaler skips a step when the gradients it unscaled hold an inf or a
NaN, which each worker decides from its own gradients, its own experts' included: one worker could
skip while the others step, and the dense weights and loss scales would drift apart.
`agreeing_on_overflow` makes every worker skip when the gradient norm, the same on every worker
(grad_norm.py all-reduces the expert term), is not finite.

--memory-efficient-fp16 / --memory-efficient-bf16 step the model's own parameters and need nothing here.
"""

import torch

FLAT_FP16_REFUSED = (
    "--fp16 with expert parallelism needs --fp16-no-flatten-grads (common.fp16_no_flatten_grads=true): fairseq's "
    "flat fp32 master copy mixes each worker's own experts into one tensor, so the gradient norm would differ "
    "between workers and checkpoints would lose the other workers' optimizer state; add --fp16-no-flatten-grads "
    "(the same arithmetic, one fp32 copy per parameter) or use --memory-efficient-fp16"
)

# attributes a master copy must share with its parameter under expert parallelism (set when the
# experts are sharded, before the optimizer exists)
EXPERT_PARALLEL_TAGS = ("expert_parallel",)


def copying_expert_tags(build_fp32_params):
    """FP16Optimizer.build_fp32_params (a classmethod, passed unbound) that also copies
    EXPERT_PARALLEL_TAGS to the per-parameter masters."""

    def build(cls, args, params, flatten=True):
        if flatten and any(getattr(p, "expert_parallel", None) is not None for p in params):
            # fairseq-hydra-train's model config does not carry --fp16, so models/model_checks.py
            # cannot refuse this there; the optimizer is built before the first update
            raise ValueError(FLAT_FP16_REFUSED)
        masters = build_fp32_params.__func__(cls, args, params, flatten)
        if not flatten:
            for p, p32 in zip(params, masters):
                for tag in EXPERT_PARALLEL_TAGS:
                    if hasattr(p, tag):
                        setattr(p32, tag, getattr(p, tag))
                if hasattr(p, "expert_parallel"):
                    p32.master_of = p  # its expert_grad_copies, as the last forward set it
        return masters

    build.copies_expert_tags = True
    return classmethod(build)


def agreeing_on_overflow(amp_step):
    """AMPOptimizer.step that skips on every worker when the last gradient norm was not finite."""

    def step(self):
        gnorm = getattr(self, "_last_grad_norm", None)
        scaler = self.scaler
        if gnorm is not None and not torch.isfinite(gnorm).all() and scaler.is_enabled():
            scaler.unscale_(self.fp32_optimizer)  # what scaler.step would do first; records found_inf
            for found_inf in scaler._per_optimizer_states[id(self.fp32_optimizer)]["found_inf_per_device"].values():
                found_inf.fill_(1.0)  # another worker's expert overflowed: skip here too
        self._last_grad_norm = None
        return amp_step(self)

    step.agrees_on_overflow = True
    return step


def remembering_grad_norm(amp_clip_grad_norm):
    """AMPOptimizer.clip_grad_norm that keeps the norm for `agreeing_on_overflow`."""

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        self._last_grad_norm = amp_clip_grad_norm(self, max_norm, aggregate_norm_fn)
        return self._last_grad_norm

    return clip_grad_norm
