"""Expert-diversify: spawn E diverse experts from the base expert that trained as a dense FFN.

Every expert e (the base's own slot included) becomes, weight matrix by weight matrix:
    mask    W_e = W_base * M_e            M_e ~ Bernoulli(1 - r) elementwise (x 1/(1-r) with rescale)
    reinit  W_e = W_base where M_e else fresh init (nn.Linear's default distribution)
    noise   W_e = W_base + s * std(W_base) * N(0, 1)
    copy    W_e = W_base
Biases are copied unchanged. The gate is re-initialised. Each expert draws from its own generator,
seeded by (--moe-seed, layer name, global expert id), so a spawn is reproducible and does not
depend on how experts are spread over workers.

Optimizer state (see `spawn_optimizer_state`): every spawned expert inherits the base expert's
Adam moments (they are scaled for weights of this size, unlike zeros, which would make the first
post-spawn steps ~sqrt(1/(1-beta2)) times too large); the gate's state is cleared, so the fresh gate
starts with fresh moments and its own bias correction.
"""

import logging
import math
import zlib
from dataclasses import dataclass

import torch

from ..moe.layer import MoELayer

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
def spawn_experts(layer: MoELayer, settings: SpawnSettings) -> None:
    """Turn the layer's base expert (local slot 0; every worker holds a copy) into its experts,
    and refresh the gate (same seed on every worker)."""
    experts = layer.experts
    base = {name: getattr(experts, name)[0].clone() for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")}
    first_global = layer.parallel.first_local_expert  # seeds follow global expert ids, whatever the placement
    for e in range(experts.num_experts):
        gen = expert_generator(settings.seed, layer.layer_name, first_global + e)
        experts.fc1_weight[e].copy_(spawn_weight(base["fc1_weight"], settings, gen))
        experts.fc2_weight[e].copy_(spawn_weight(base["fc2_weight"], settings, gen))
        experts.fc1_bias[e].copy_(base["fc1_bias"])
        experts.fc2_bias[e].copy_(base["fc2_bias"])
    router = getattr(layer.gate, "router", None)
    if router is not None:
        router.reset_parameters(generator=expert_generator(settings.seed, layer.layer_name, -1))
    layer.spawned.fill_(True)


def torch_optimizer(optimizer):
    """The torch optimizer inside a fairseq optimizer wrapper whose state is keyed by the model's
    parameters, or None (fairseq's FP16Optimizer keeps flat fp32 master copies instead)."""
    if hasattr(optimizer, "fp32_optimizer") or hasattr(optimizer, "fp32_params"):
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


def spawn_optimizer_state(layer: MoELayer, optimizer) -> bool:
    """Give every spawned expert the base expert's optimizer moments; clear the gate's state.

    Returns False (state left as is) when the optimizer keeps its own flat copies of the params.
    """
    opt = torch_optimizer(optimizer)
    if opt is None:
        return False
    for p in layer.experts.parameters():
        state = opt.state.get(p)
        if not state:
            continue
        for value in state.values():
            if torch.is_tensor(value) and value.shape == p.shape:
                value.copy_(value[0:1].expand_as(value))
    for p in layer.gate.parameters():
        opt.state.pop(p, None)
    return True
