"""EvoMoE's expert-diversify phase in an MoE layer.

Before the spawn at update T_div, a `DiversifyingMoELayer` runs one base expert, expert 0, as a
dense FFN on every token: no gate, no balance loss, no capacity. Under expert parallelism every
worker holds the base expert in all its slots (`share_base_expert`) and runs it on its own tokens,
with its gradient averaged over all workers as for a dense weight. At T_div the experts are
spawned from it (spawn.py) and from then on the layer is an ordinary MoELayer.

Who spawns: the evomoe_* tasks (controller.py), which also put the spawned weights into the
optimizer's copies and state. Under any other task (a plain one, `DiversifyPlan.plain_task`) the
layer spawns itself in `set_num_updates`, into the model's weights only. With half-precision weights
(--fp16/--bf16) fairseq steps fp32 master copies and writes them back after every update, which
would undo that spawn without a word, so such a layer refuses to train (`check_spawn_reaches_optimizer`,
at its first training forward, before any update).

What a checkpoint keeps: the `spawned` flag (a resume never spawns twice, and a checkpoint from
before the spawn routes nothing) and T_div (`spawn_update`, which a resumed run keeps whatever its
--max-update: saved_schedule.py). A checkpoint written before the spawn loads on any number of
workers: each worker's slots, and their optimizer state, take global expert 0's
(`load_base_expert_state`), as the run that wrote it held them.
"""

from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..moe.experts import EXPERT_PARAM_NAMES
from ..moe.host_flag import HostFlag
from ..moe.layer import MoELayer
from ..moe.parallel.exchange import data_parallel_params
from ..moe.parallel.optimizer_state import keep_local_slices
from .saved_schedule import saved_update_counts
from .schedule import Phase
from .spawn import SpawnSettings, spawn_experts
from .stepped_copies import torch_optimizer


@dataclass(frozen=True)
class DiversifyPlan:
    """What a layer needs to know about its expert-diversify phase."""

    updates: int  # T_div: spawn before the training step of this update
    spawn: SpawnSettings
    # the task's name when it is not an evomoe_* task: the layer then spawns on its own, and nothing
    # puts the spawned weights into the optimizer's copies (None: an evomoe_* task spawns)
    plain_task: Optional[str] = None


class DiversifyingMoELayer(MoELayer):
    def __init__(self, gate, experts, plan: DiversifyPlan, **kwargs):
        super().__init__(gate, experts, **kwargs)
        self.plan = plan
        self.register_buffer("spawned", torch.tensor(False))
        self._spawned_flag = HostFlag()
        self.register_buffer("spawn_update", torch.tensor(plan.updates))
        self.share_base_expert()

    @property
    def is_spawned(self) -> bool:
        """bool(self.spawned), read from the device only when the buffer changed (HostFlag): this is
        asked on every forward."""
        return self._spawned_flag(self.spawned)

    @property
    def gate_routes(self) -> bool:
        return self.is_spawned

    def state_for_logging(self) -> Dict[str, float]:
        state = self.gate.state_for_logging()
        return state if self.is_spawned else {**state, "phase": int(Phase.DIVERSIFY)}

    # -- the spawn ---------------------------------------------------------------------------

    def reset_schedule(self) -> None:
        super().reset_schedule()
        self.spawned.fill_(False)

    def spawn_due(self, num_updates: int) -> bool:
        return not self.is_spawned and num_updates >= self.plan.updates

    def spawn(self) -> None:
        spawn_experts(self, self.plan.spawn)
        self.spawned.fill_(True)

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this on every module before each training step and on checkpoint load.

        The evomoe_* tasks spawn the experts first (and fix the optimizer state); this is the
        fallback that keeps the spawn on schedule under any other task (in fp32 or with --amp
        only: see check_spawn_reaches_optimizer)."""
        super().set_num_updates(num_updates)
        if self.spawn_due(num_updates):
            self.spawn()

    # -- the base expert ---------------------------------------------------------------------

    @torch.no_grad()
    def share_base_expert(self) -> None:
        """Make every local expert slot a copy of global expert 0, the base expert (under expert
        parallelism rank 0 holds it in its slot 0 and broadcasts it)."""
        for n in EXPERT_PARAM_NAMES:
            p = getattr(self.experts, n)
            base = p[0].clone()
            if self.placement.is_distributed:
                dist.broadcast(base, src=0)
            p.copy_(base.unsqueeze(0).expand_as(p))

    def reset_experts(self, std: float) -> None:
        super().reset_experts(std)
        self.share_base_expert()

    def forward_tokens(self, x: Tensor, token_ids: Optional[Tensor], valid: Optional[Tensor] = None) -> Tensor:
        if self.is_spawned:
            return super().forward_tokens(x, token_ids, valid)
        if self.training:
            self.check_spawn_reaches_optimizer()
        return self.base_expert_forward(x, valid)

    def check_spawn_reaches_optimizer(self) -> None:
        """Refuse to train towards a spawn that the optimizer would undo: under a plain task with
        half-precision weights (fairseq's --fp16/--bf16 optimizers step fp32 master copies, which
        this layer's own spawn does not reach). Evaluation and the evomoe_* tasks never get here."""
        dtype = self.experts.fc1_weight.dtype
        task = self.plan.plain_task
        if task is None or dtype not in (torch.float16, torch.bfloat16):
            return
        raise ValueError(
            f"--evomoe-diversify-updates ({self.plan.updates}) with --fp16/--bf16 needs an evomoe_* task "
            f"(--task evomoe_translation, evomoe_language_modeling or evomoe_masked_lm), not {task}: under {task} "
            f"the MoE layers spawn the experts themselves at update {self.plan.updates}, into the model's "
            f"{str(dtype).replace('torch.', '')} weights only, and fairseq's fp32 master copies of those weights would "
            "write the base expert back at the next update; use the evomoe_* task, or train in fp32 or with --amp"
        )

    def base_expert_forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """The base expert (local slot 0) as a dense FFN on this worker's tokens (valid: the real
        ones, None: all; the others output 0)."""
        params = data_parallel_params(self.experts, self.placement)
        if x.device.type != "cpu":  # (the group sizes of a list would be copied to the GPU, a host wait)
            y = self.experts.forward_one(x, 0, params=params)
        else:
            # every token in expert 0's group of the experts' own path: its weight gradients reuse
            # their memory from step to step
            y = self.experts(x, [x.shape[0]] + [0] * (self.experts.num_experts - 1), params=params)
        # the gate gets an exact zero gradient (keeps data-parallel reducers consistent)
        zero = sum((p.sum() for p in self.gate.parameters()), x.new_zeros((), dtype=torch.float)) * 0.0
        n = torch.tensor(float(x.shape[0])) if valid is None else valid.sum().float()
        if valid is not None:
            y = torch.where(valid[:, None], y, 0)
        self.metadata = {
            "balance_loss": x.new_zeros((), dtype=torch.float) + zero,
            "z_loss": x.new_zeros((), dtype=torch.float),
            "kept_assignments": n.double(),
        }
        if self.collect_stats:
            zeros_e = x.new_zeros(self.num_experts, dtype=torch.float)
            zeros_e[0] = n
            self.metadata.update({
                "num_tokens": n,
                "tokens_per_expert": zeros_e.detach(),
                "routed_per_expert": zeros_e.detach(),
                "dropped_frac": torch.tensor(0.0),
                "experts_per_token": torch.tensor(1.0),
                "tokens_unserved": torch.tensor(0.0),
                "router_entropy": torch.tensor(0.0),
            })
        return y + zero.to(y.dtype)

    # -- checkpoints -------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        spawned = state_dict.get(prefix + "spawned")
        if spawned is not None and not bool(spawned) and self.placement.is_distributed:
            # every worker's slots take the base expert; the experts' own load hook then keeps
            # this worker's rows (moe/parallel/checkpoint.py)
            for n in EXPERT_PARAM_NAMES:
                t = state_dict.get(f"{prefix}experts.{n}")
                if t is not None and t.dim() > 0:
                    state_dict[f"{prefix}experts.{n}"] = t[0:1].expand_as(t)
        saved, = saved_update_counts(state_dict, prefix + "spawn_update", self.spawn_update, "T_div")
        if saved >= 0:
            self.plan = replace(self.plan, updates=saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def load_base_expert_state(layer: DiversifyingMoELayer, optimizer) -> None:
    """Under expert parallelism, optimizer state loaded from a checkpoint holds all E experts until
    a worker keeps its slice. While the layer is not spawned, every local slot takes global expert
    0's state, as its weights did on load. Call before the spawn or the optimizer step touch it."""
    if layer.is_spawned or not layer.placement.is_distributed:
        return
    local = layer.placement.num_local_experts
    keep_local_slices(torch_optimizer(optimizer), layer.experts.parameters(),
                      rows=lambda full: full[0:1].expand(local, *full.shape[1:]))
