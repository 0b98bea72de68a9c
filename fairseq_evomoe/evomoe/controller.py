"""The phase controller the evomoe_* tasks share: update counter -> spawn, tau, phase -> model.

It holds no schedule of its own: each DiversifyingMoELayer carries its diversify plan (set at
model build) and the DTS gate derives tau and the soft/hard phase from `set_num_updates`. The
controller spawns the experts at T_div (once: the layer's `spawned` buffer is in every checkpoint),
fixes the optimizer state of the spawned weights, pushes the update counter into the model before
train and valid steps, and logs a line at each phase change.
"""

import logging
from typing import List, Optional

from ..moe.layer import MoELayer, moe_layers
from .dts_gate import DenseToSparseGate
from .expert_diversify import DiversifyingMoELayer, load_base_expert_state
from .schedule import Phase
from .spawn import spawn_optimizer_state

logger = logging.getLogger(__name__)


def diversifying_layers(model) -> List[DiversifyingMoELayer]:
    return [m for m in moe_layers(model) if isinstance(m, DiversifyingMoELayer)]


def layer_phase(layer: MoELayer) -> Optional[Phase]:
    """The layer's EvoMoE phase: diversify before its spawn, then its DTS gate's phase; None for any
    other gate (a baseline under an evomoe_* task; StableMoE's stages are not EvoMoE phases)."""
    if isinstance(layer, DiversifyingMoELayer) and not layer.is_spawned:
        return Phase.DIVERSIFY
    return layer.gate.phase if isinstance(layer.gate, DenseToSparseGate) else None


class PhaseController:
    def __init__(self):
        self.last_phase: Optional[Phase] = None
        self.num_updates: Optional[int] = None

    def before_train_step(self, model, optimizer, update_num: int) -> None:
        layers = [m for m in diversifying_layers(model) if not m.is_spawned]
        for m in layers:
            load_base_expert_state(m, optimizer)
        due = [m for m in layers if m.spawn_due(update_num)]
        for m in due:
            m.spawn()
            if not spawn_optimizer_state(m, optimizer):
                raise RuntimeError(
                    f"EvoMoE: cannot find the copies of the MoE parameters that {type(optimizer).__name__} steps; "
                    "the spawn would be overwritten by the next step"
                )
        if due:
            s = due[0].plan.spawn
            logger.info(
                f"EvoMoE: spawned {due[0].num_experts} experts in each of {len(due)} MoE layers at update {update_num} "
                f"(mode {s.mode}, mask ratio {s.mask_ratio}); gates re-initialised"
            )
        self.push(model, update_num)

    def before_valid_step(self, model) -> None:
        if self.num_updates is not None:
            self.push(model, self.num_updates)

    def push(self, model, num_updates: int) -> None:
        self.num_updates = num_updates
        model.set_num_updates(num_updates)
        layers = moe_layers(model)
        if not layers:
            return
        phase = layer_phase(layers[0])
        if phase is not None and phase != self.last_phase:
            state = layers[0].state_for_logging()
            tau = f", tau {state['temperature']:.3f}" if "temperature" in state and phase == Phase.SOFT else ""
            logger.info(f"EvoMoE phase at update {num_updates}: {phase.name.lower()}{tau}")
            self.last_phase = phase
