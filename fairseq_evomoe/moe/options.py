"""Command-line options of the MoE architectures, their defaults and their validation.

Options live in dataclasses with `help=` metadata (fairseq's convention): `MoEOptions` for the
layer, plus one dataclass per gate or feature registered with `register_options` (each gate
module registers its own). Architectures add them all to the parser without defaults, so named
variants can set their own; `apply_defaults` fills what neither the user nor the variant set.
"""

from dataclasses import MISSING, dataclass, field, fields
from typing import List, Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

from ..option_values import require_finite
from .dispatch import DROP_POLICIES
from .experts import EXPERT_DTYPES
from .gates.base import GATE_REGISTRY


@dataclass
class MoEOptions(FairseqDataclass):
    moe_expert_count: int = field(default=4, metadata={"help": "number of experts in each MoE layer (default 4)"})
    moe_freq: int = field(
        default=2,
        metadata={"help": "layer i (0-based) of each stack is MoE when (i+1) %% moe_freq == 0; 0 = no MoE layer (default 2)"},
    )
    moe_expert_ffn_dim: Optional[int] = field(
        default=None, metadata={"help": "hidden size of each expert FFN (default: the dense FFN's size)"}
    )
    moe_gate: str = field(default="top1", metadata={"help": "routing gate (default top1); see --moe-gate choices in the error message"})
    moe_capacity_factor: float = field(
        default=1.0,
        metadata={"help": "training capacity: each expert takes ceil(f * k * tokens / experts) assignments; 0 = dropless (default 1.0)"},
    )
    moe_eval_capacity_factor: float = field(
        default=0.0,
        metadata={"help": "capacity factor at validation and generation; 0 = dropless, -1 = same as training (default 0); "
                  "the dts gate never drops at evaluation"},
    )
    moe_drop_policy: str = field(
        default="score",
        metadata={"help": "which assignments an overflowing expert keeps: score (highest gate weight, batch-prioritized) or position (arrival order)"},
    )
    moe_router_jitter: float = field(
        default=0.0, metadata={"help": "multiply router inputs by U(1-eps, 1+eps) during training (Switch); 0 = off"}
    )
    moe_rerun_schedules: bool = field(
        default=False,
        metadata={"help": "routing schedules (the DTS gate's phases and temperature, StableMoE's stages) follow this "
                  "run's update counter even where the loaded checkpoint had got further; by default a loaded model "
                  "never goes back to an earlier routing phase, e.g. when fine-tuning restarts the counter"},
    )
    moe_seed: int = field(default=1, metadata={"help": "seed of MoE-specific randomness (hash tables, and any MoE method's own draws)"})
    moe_expert_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the experts' matmuls: auto (the model's, or autocast's under --amp) or bf16 (the "
                  "experts alone in bfloat16, cast from and back to the model's dtype: under --fp16 on Hopper GPUs "
                  "this reaches torch's fast grouped kernel; GPUs with bf16 only)"},
    )


OPTION_CLASSES: List[type] = [MoEOptions]


def register_options(cls: type) -> type:
    """Add a dataclass of options to every MoE architecture's command line."""
    if cls not in OPTION_CLASSES:
        OPTION_CLASSES.append(cls)
    return cls


def all_option_classes() -> List[type]:
    classes = list(OPTION_CLASSES)
    for spec in GATE_REGISTRY.values():
        if spec.options is not None and spec.options not in classes:
            classes.append(spec.options)
    return classes


def add_moe_args(parser) -> None:
    for cls in all_option_classes():
        gen_parser_from_dataclass(parser, cls(), delete_default=True)


def apply_defaults(args) -> None:
    """Set every MoE option that is still missing on `args` to its dataclass default."""
    for cls in all_option_classes():
        for f in fields(cls):
            if getattr(args, f.name, None) is None and f.default is not MISSING:
                setattr(args, f.name, f.default)


# Gate options the shipped Hydra configs (and benchmarks/compare_gates.py) set for every gate, so
# that choosing that gate needs no other override; they are not warned about when another gate runs.
SET_FOR_EVERY_GATE = frozenset({"stablemoe_stage2_update"})


def unused_gate_options(args) -> List[str]:
    """The options of gates other than --moe-gate that are set away from their defaults (each as
    "--option value (--moe-gate name)"): the chosen gate ignores them, which a user may not expect."""
    chosen = GATE_REGISTRY.get(args.moe_gate)
    own = {f.name for f in fields(chosen.options)} if chosen is not None and chosen.options is not None else set()
    found = []
    for name, spec in sorted(GATE_REGISTRY.items()):
        if name == args.moe_gate or spec.options is None:
            continue
        for f in fields(spec.options):
            if f.name.startswith("_") or f.name in own or f.name in SET_FOR_EVERY_GATE or f.default is MISSING:
                continue
            value = getattr(args, f.name, f.default)
            if value != f.default:
                found.append(f"--{f.name.replace('_', '-')} {value} (--moe-gate {name})")
    return found


def moe_layer_indices(num_layers: int, moe_freq: int) -> List[int]:
    """Indices of the MoE layers in a stack of `num_layers`: (i + 1) % moe_freq == 0."""
    if moe_freq == 0:
        return []
    return [i for i in range(num_layers) if (i + 1) % moe_freq == 0]


def validate(args, stacks) -> None:
    """Reject bad MoE settings before anything is built; `stacks` maps a stack name to its layer count."""

    def bad(msg):
        raise ValueError(msg)

    if args.moe_expert_count < 1:
        bad(f"--moe-expert-count must be >= 1, got {args.moe_expert_count}")
    if args.moe_freq < 0:
        bad(f"--moe-freq must be >= 0 (0 = no MoE layer), got {args.moe_freq}")
    for name, layers in stacks.items():
        if args.moe_freq > layers:
            bad(f"--moe-freq {args.moe_freq} is larger than the {layers} layers of the {name}: no layer would be MoE; "
                f"use 1..{layers}, or 0 for a dense model")
    if not 0 <= args.moe_seed < 2**63:
        bad(f"--moe-seed must be in [0, 2^63 - 1], got {args.moe_seed}")
    if args.moe_gate not in GATE_REGISTRY:
        bad(f"--moe-gate {args.moe_gate!r} is not a known gate; choose one of: {', '.join(sorted(GATE_REGISTRY))}")
    require_finite({"--moe-capacity-factor": args.moe_capacity_factor, "--moe-eval-capacity-factor": args.moe_eval_capacity_factor,
                    "--moe-router-jitter": args.moe_router_jitter})
    if args.moe_capacity_factor < 0:
        bad(f"--moe-capacity-factor must be >= 0 (0 = dropless), got {args.moe_capacity_factor}")
    if args.moe_eval_capacity_factor < 0 and args.moe_eval_capacity_factor != -1:
        bad(f"--moe-eval-capacity-factor must be >= 0 (0 = dropless) or -1 (same as training), got {args.moe_eval_capacity_factor}")
    if args.moe_drop_policy not in DROP_POLICIES:
        bad(f"--moe-drop-policy {args.moe_drop_policy!r} is not valid; choose one of: {', '.join(DROP_POLICIES)}")
    if args.moe_expert_ffn_dim is not None and args.moe_expert_ffn_dim < 1:
        bad(f"--moe-expert-ffn-dim must be >= 1, got {args.moe_expert_ffn_dim}")
    if not 0 <= args.moe_router_jitter < 1:
        bad(f"--moe-router-jitter must be in [0, 1), got {args.moe_router_jitter}")
    if args.moe_expert_dtype not in EXPERT_DTYPES:
        bad(f"--moe-expert-dtype {args.moe_expert_dtype!r} is not valid; choose one of: {', '.join(EXPERT_DTYPES)}")
    if args.moe_expert_dtype == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        bad(f"--moe-expert-dtype bf16 needs a GPU with bfloat16 support; {torch.cuda.get_device_name()} has none (use auto)")
    if getattr(args, "scale_fc", False):
        bad("--scale-fc (a LayerNorm inside the FFN) is not supported in MoE layers")
