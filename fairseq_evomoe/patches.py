"""Every place where fairseq-evomoe changes how fairseq or torch behave beyond their extension
points, with its reason. Each is installed here and nowhere else.

Installed when the package is imported (`install_at_import`):

1. `torch.serialization.add_safe_globals` with the config types fairseq stores in checkpoints
   (checkpoint_compat.py). torch >= 2.6 loads checkpoints with `weights_only=True`, which rejects
   them; allowlisting them keeps the safe unpickler on for everything else.
2. `fairseq.distributed.utils.distributed_main` is wrapped (moe/parallel/process_group.py). Every
   distributed worker runs it; fairseq never destroys its process group, and torch._dynamo
   (imported with the first optimizer) keeps the group alive, so gloo's threads could still run
   while the interpreter exits and abort a finished worker. The wrapper imports torch._dynamo
   before the group exists and destroys the group after fairseq's closing barrier.
3. `fairseq.trainer.Trainer.__init__` is wrapped (models/model_checks.py,
   `checking_before_training`). A model with MoE layers under a criterion that does not add their
   losses is refused before the trainer is built, under fairseq-train and fairseq-hydra-train
   alike; the model's own check (the first training forward) sees the criterion only where the
   model's options name it, which fairseq-hydra-train's do not. A --restore-file that names no
   file is refused once the trainer is built (fairseq would train from scratch); only training
   builds a trainer, so generation, which rebuilds the model from the training options, is not
   affected.

Installed only when a model is built under expert parallelism, torch.distributed with more than one
worker (`install_for_expert_parallelism`, called by models/moe_stack.py); one process never
installs them:

4. `fairseq.utils.clip_grad_norm_` is wrapped (moe/parallel/grad_norm.py). fairseq leaves the
   experts (`p.expert`) out of the gradient norm and has no hook to add them; the wrapper calls
   fairseq's function and adds every expert's gradient exactly once, so all workers clip by the
   norm one process would compute.
5. A global torch optimizer step pre-hook (`torch.optim.optimizer.register_optimizer_step_pre_hook`,
   moe/parallel/optimizer_state.py). fairseq builds its optimizer with no hook for us; the first
   step of an optimizer holding expert-parallel parameters gives it `consolidate_state_dict` (the
   method fairseq calls on every rank before a save) and a `state_dict` post-hook, so checkpoints
   hold every expert's optimizer state, and each step first slices freshly loaded state to this
   worker's experts.
6. fairseq's mixed-precision optimizers (moe/parallel/mixed_precision.py):
   `FP16Optimizer.build_fp32_params` also copies the expert-parallel tags to the fp32 master copies
   (fairseq copies only `expert`), so --bf16 and --fp16 --fp16-no-flatten-grads count every expert
   once in the gradient norm and save complete optimizer state; `AMPOptimizer.clip_grad_norm` keeps
   the norm and `AMPOptimizer.step` skips on every worker when it is not finite (torch's GradScaler
   decides from each worker's own gradients).

Not patches, but reaching past public APIs:

- moe/grad_memory.py reads `torch._C._storage_Use_Count` to reuse expert-gradient memory only when
  nothing else holds it; without that function it never reuses.
- The models subclass fairseq's encoders, decoders and layers and override documented methods;
  the evomoe_* tasks subclass fairseq's tasks and override `train_step`, `valid_step` and
  `optimizer_step`, which fairseq's trainer calls anyway.
"""

from fairseq import utils as fairseq_utils
from fairseq.distributed import utils as distributed_utils
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin
from fairseq.trainer import Trainer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .checkpoint_compat import allow_fairseq_checkpoints
from .models import model_checks
from .moe.parallel import grad_norm, mixed_precision, optimizer_state, process_group


def install_at_import() -> None:
    """Patches 1, 2 and 3 (once per process)."""
    allow_fairseq_checkpoints()
    if not getattr(Trainer.__init__, "checks_before_training", False):
        Trainer.__init__ = model_checks.checking_before_training(Trainer.__init__)
    if not getattr(distributed_utils.distributed_main, "ends_cleanly", False):
        distributed_utils.distributed_main = process_group.ending_cleanly(distributed_utils.distributed_main)


def install_for_expert_parallelism() -> None:
    """Patches 4, 5 and 6 (once per process)."""
    if getattr(fairseq_utils.clip_grad_norm_, "counts_experts", False):
        return
    fairseq_utils.clip_grad_norm_ = grad_norm.counting_experts(fairseq_utils.clip_grad_norm_)
    register_optimizer_step_pre_hook(optimizer_state.before_step)
    _FP16OptimizerMixin.build_fp32_params = mixed_precision.copying_expert_tags(_FP16OptimizerMixin.build_fp32_params)
    AMPOptimizer.clip_grad_norm = mixed_precision.remembering_grad_norm(AMPOptimizer.clip_grad_norm)
    AMPOptimizer.step = mixed_precision.agreeing_on_overflow(AMPOptimizer.step)
