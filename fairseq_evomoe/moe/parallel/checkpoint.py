"""Expert parallelism and fairseq: DDP, checkpoints that load at any world size.

Checkpoint format: always the single-process one. Each MoE layer stores its experts as the full
[E, ...] tensors (`...moe.experts.fc1_weight` etc.), whatever the world size of the run that wrote
it, so `fairseq-generate`, `fairseq-eval-lm` and `--restore-file` load it on 1 worker or on any W
that E and W allow, with no conversion step. On load, each worker keeps its own slice of the full
tensors (a `load_state_dict` pre-hook on the experts module); a checkpoint written by one process
is byte-for-byte what it was before expert parallelism existed.

Saving with W > 1: fairseq 0.12 writes checkpoints from rank 0 only, and the other ranks make no
call into the model at save time (checkpoint_utils.save_checkpoint returns early on them; only FSDP
gets `state_dict()` called on every rank). So rank 0 cannot gather the experts inside
`state_dict()`. Instead every rank takes part in a gather when the model switches from training to
evaluation (`model.eval()`, which fairseq's `valid_step` calls on every rank, in the same order):
rank 0 keeps a CPU copy of all experts from that moment. fairseq validates before every save
unless validation is disabled or postponed (`--disable-validation`, `--validate-after-updates`,
a `--validate-interval` that does not divide `--save-interval`); the state_dict hook checks that
the copy is current (rank 0's own expert weights have not changed since: their tensor versions,
and their values, since fairseq's optimizers write through `p.data`) and raises a clear error
instead of writing a checkpoint with stale or missing experts.

Atomic save: fairseq's `checkpoint_utils.torch_persistent_save` writes `<file>.tmp` and renames it
over `<file>` (for local paths; PathManager.supports_rename), and the additional names
(checkpoint_last.pt, checkpoint_best.pt) are copies of the finished file. The state dict is built
entirely before the temp file is opened, so a failure above (e.g. a stale expert copy) leaves the
previous checkpoint untouched.

Optimizer state: see docs/distributed.md ("What a checkpoint keeps").
"""

from typing import Dict, List, Optional

import torch

from ..experts import EXPERT_PARAM_NAMES
from .collectives import gather_to_rank0
from .placement import ExpertPlacement


def install_checkpoint_hooks(experts, placement: ExpertPlacement) -> None:
    """Save this layer's full experts from rank 0, and load each worker's own slice (see above)."""
    experts._expert_placement = placement
    experts._expert_snapshot = None
    if getattr(experts, "_expert_hooks_installed", False):
        return
    experts.register_state_dict_post_hook(_save_full_experts)
    experts.register_load_state_dict_pre_hook(_load_local_experts)
    experts._expert_hooks_installed = True


def _placement(experts) -> Optional[ExpertPlacement]:
    placement = getattr(experts, "_expert_placement", None)
    return placement if placement is not None and placement.is_distributed else None


def _local_versions(experts) -> tuple:
    return tuple((id(getattr(experts, n)), getattr(experts, n)._version) for n in EXPERT_PARAM_NAMES)


def _snapshot_holds_local(experts, snap: dict, par: ExpertPlacement) -> bool:
    """Whether rank 0's own experts still equal their rows of the gathered copy. (Tensor versions
    alone miss fairseq's optimizers, which write through `p.data`; one device-to-host copy of the
    local experts per save.)"""
    rows = list(par.local_experts)
    return all(torch.equal(getattr(experts, n).detach().cpu(), snap["tensors"][n][rows]) for n in EXPERT_PARAM_NAMES)


def _save_full_experts(experts, state_dict, prefix, local_metadata) -> None:
    par = _placement(experts)
    if par is None:
        return
    snap = experts._expert_snapshot
    if snap is None or snap["versions"] != _local_versions(experts) or not _snapshot_holds_local(experts, snap, par):
        raise RuntimeError(
            f"cannot save the experts of {prefix.rstrip('.')}: with expert parallelism over {par.world_size} workers "
            "the full expert tensors are gathered on rank 0 when the model switches to evaluation (validation), "
            "and the weights changed since (or this is not rank 0). Keep validation before each save "
            "(no --disable-validation / --validate-after-updates beyond the save points), or call "
            "fairseq_evomoe.moe.parallel.checkpoint.gather_experts(model) on every rank before state_dict()."
        )
    for n in EXPERT_PARAM_NAMES:
        state_dict[prefix + n] = snap["tensors"][n]


def _load_local_experts(experts, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    par = _placement(experts)
    if par is None:
        return
    for n in EXPERT_PARAM_NAMES:
        key = prefix + n
        t = state_dict.get(key)
        if t is None or t.dim() == 0:
            continue
        if t.shape[0] == par.num_experts:
            state_dict[key] = par.local_part(t)
        elif t.shape[0] != par.num_local_experts:
            errors.append(
                f"{key}: the checkpoint has {t.shape[0]} experts, the model {par.num_experts} "
                f"(check --moe-expert-count)"
            )
            state_dict.pop(key)


def expert_modules(model) -> List[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "_expert_hooks_installed", False)]


@torch.no_grad()
def gather_experts(model) -> None:
    """Collective (call on every rank): rank 0 keeps a CPU copy of every layer's full experts."""
    for experts in expert_modules(model):
        par = _placement(experts)
        if par is None:
            continue
        tensors: Dict[str, torch.Tensor] = {}
        for n in EXPERT_PARAM_NAMES:
            full = gather_to_rank0(getattr(experts, n).detach(), par)
            if full is not None:
                tensors[n] = full
        experts._expert_snapshot = {"versions": _local_versions(experts), "tensors": tensors} if par.rank == 0 else None


def expert_param_names(model) -> List[str]:
    """Names of the parameters that data-parallel all-reduce must skip (expert-parallel experts)."""
    names = []
    for mod_name, experts in model.named_modules():
        if _placement(experts) is not None:
            names.extend(f"{mod_name}.{n}" if mod_name else n for n in EXPERT_PARAM_NAMES)
    return names


class ExpertParallelModelMixin:
    """Mixed into the MoE fairseq models (first base class).

    - `_ddp_params_and_buffers_to_ignore`: torch DDP (fairseq's --ddp-backend pytorch_ddp/c10d)
      reads it from the wrapped module and leaves those parameters out of its all-reduce and of its
      initial broadcast. fairseq's legacy_ddp skips parameters tagged `p.expert` by itself.
    - `train(False)` after training gathers the experts on rank 0 for the next checkpoint.
    """

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> List[str]:
        return expert_param_names(self)

    def train(self, mode: bool = True):
        was_training = self.training
        out = super().train(mode)
        if was_training and not mode:
            gather_experts(self)
        return out
