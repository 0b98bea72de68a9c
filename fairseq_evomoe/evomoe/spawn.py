"""Expert-diversify: spawn E diverse experts from the base expert that trained as a dense FFN.

Every expert e (the base's own slot included) becomes, weight matrix by weight matrix:
    mask    W_e = W_base * M_e            M_e ~ Bernoulli(1 - r) elementwise (x 1/(1-r) with rescale)
    reinit  W_e = W_base where M_e else fresh init (nn.Linear's default distribution)
    noise   W_e = W_base + s * std(W_base) * N(0, 1)
    copy    W_e = W_base
Biases are copied unchanged. The gate is re-initialised. Each expert draws from its own generator,
seeded by (--moe-seed, layer name, global expert id), so a spawn is reproducible and does not
depend on how experts are spread over workers.

Optimizer state (see `spawn_optimizer_state`): the optimizer's own copy of the weights (fp32
masters under --fp16/--bf16, where the experts are spawned from the base's fp32 master) gets the
spawned ones; every spawned expert inherits the base expert's
Adam moments (they are scaled for weights of this size, unlike zeros, which would make the first
post-spawn steps ~sqrt(1/(1-beta2)) times too large); the gate's state is cleared, so the fresh gate
starts with fresh moments and its own bias correction.
"""

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Dict

import torch

from ..moe.experts import EXPERT_PARAM_NAMES
from ..moe.layer import MoELayer
from ..moe.parallel.optimizer_state import keep_local_slices
from .stepped_copies import stepped_copies, torch_optimizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpawnSettings:
    mode: str = "mask"
    mask_ratio: float = 0.5
    rescale: bool = False
    noise_scale: float = 0.01
    seed: int = 1

    @classmethod
    def from_args(cls, args) -> "SpawnSettings":
        return cls(args.evomoe_spawn_mode, args.evomoe_mask_ratio, args.evomoe_mask_rescale, args.evomoe_noise_scale, args.moe_seed)


def expert_generator(seed: int, layer_name: str, expert: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(layer_name.encode()) * 1009 + expert) % (2**63))


def spawn_weight(base: torch.Tensor, settings: SpawnSettings, gen: torch.Generator) -> torch.Tensor:
    """One spawned weight matrix from the base expert's [out, in] matrix."""
    if settings.mode == "copy":
        return base.clone()
    if settings.mode == "noise":
        noise = torch.randn(base.shape, generator=gen, dtype=torch.float32).to(base)
        return base + settings.noise_scale * base.float().std().to(base) * noise
    keep = (torch.rand(base.shape, generator=gen) >= settings.mask_ratio).to(base.device)
    if settings.mode == "mask":
        out = base * keep
        return out / (1.0 - settings.mask_ratio) if settings.rescale else out
    if settings.mode == "reinit":
        bound = 1.0 / math.sqrt(base.shape[-1])
        fresh = (torch.rand(base.shape, generator=gen) * 2 - 1).mul_(bound).to(base)
        return torch.where(keep, base, fresh)
    raise ValueError(f"unknown spawn mode {settings.mode!r}")


@torch.no_grad()
def spawn_into(weights: Dict[str, torch.Tensor], layer: MoELayer, settings: SpawnSettings) -> None:
    """Spawn, in place, the layer's experts held in `weights` ({name in EXPERT_PARAM_NAMES: [local
    experts, ...]}: the parameters, or the optimizer's fp32 copies of them) from their slot 0."""
    base = {name: w[0].clone() for name, w in weights.items()}
    first_global = layer.placement.first_local_expert  # seeds follow global expert ids, whatever the placement
    for e in range(layer.experts.num_experts):
        gen = expert_generator(settings.seed, layer.layer_name, first_global + e)
        weights["fc1_weight"][e].copy_(spawn_weight(base["fc1_weight"], settings, gen))
        weights["fc2_weight"][e].copy_(spawn_weight(base["fc2_weight"], settings, gen))
        weights["fc1_bias"][e].copy_(base["fc1_bias"])
        weights["fc2_bias"][e].copy_(base["fc2_bias"])


@torch.no_grad()
def spawn_experts(layer: MoELayer, settings: SpawnSettings) -> None:
    """Turn the layer's base expert (local slot 0; every worker holds a copy) into its experts,
    and refresh the gate (same seed on every worker). The layer records the spawn itself
    (expert_diversify.DiversifyingMoELayer.spawn)."""
    spawn_into({name: getattr(layer.experts, name) for name in EXPERT_PARAM_NAMES}, layer, settings)
    router = getattr(layer.gate, "router", None)
    if router is not None:
        router.reset_parameters(generator=expert_generator(settings.seed, layer.layer_name, -1))


def spawn_optimizer_state(layer: MoELayer, optimizer) -> bool:
    """After a DiversifyingMoELayer's spawn (`spawn_experts` with its plan's settings): make the
    optimizer step from the spawned weights and the fresh gate, give every spawned expert the base
    expert's moments, and restart the gate's.

    With fp32 master copies (FP16Optimizer) the experts are spawned again in them, from the base
    expert's fp32 master (the same draws), and the model's half-precision experts are their
    rounding, or the next step would write the pre-spawn weights back into the model; the fresh
    gate is copied into its masters. The gate's state is dropped where it has its own (fresh moments
    and bias correction); in a flat master copy its moments are zeroed (the step count is shared).
    Returns False, changing nothing, for an unknown optimizer layout.
    """
    experts = [getattr(layer.experts, name) for name in EXPERT_PARAM_NAMES]
    gate = list(layer.gate.parameters())
    opt = torch_optimizer(optimizer)
    keep_local_slices(opt, experts)
    copies = stepped_copies(optimizer, experts + gate)
    if copies is None:
        return False
    if any(c.master.data_ptr() != p.data_ptr() for p, c in zip(experts, copies)):
        with torch.no_grad():
            spawn_into({name: c.master for name, c in zip(EXPERT_PARAM_NAMES, copies)}, layer, layer.plan.spawn)
            for p, c in zip(experts, copies):
                p.data.copy_(c.master)
    for p, c in zip(gate, copies[len(experts):]):
        if c.master.data_ptr() != p.data_ptr():
            c.master.copy_(p.data)
    for c in copies[: len(experts)]:
        for value in c.state.values():
            value.copy_(value[0:1].expand_as(value))
    for c in copies[len(experts):]:
        if c.key is not None:
            opt.state.pop(c.key, None)
        else:
            for value in c.state.values():
                value.zero_()
    return True
