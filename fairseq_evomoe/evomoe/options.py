"""Model options of EvoMoE's expert-diversify phase (the DTS gate's own options are in dts_gate.py)."""

from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass

from ..moe.options import register_options
from ..option_values import require_finite

SPAWN_MODES = ("mask", "reinit", "noise", "copy")


@register_options
@dataclass
class EvoMoEOptions(FairseqDataclass):
    evomoe_diversify_updates: float = field(
        default=0,
        metadata={"help": "EvoMoE expert-diversify length T_div: train one base expert as a dense FFN for this many updates "
                  "(a fraction < 1 means of --max-update), then spawn the experts; 0 = no diversify phase. "
                  "Train with an evomoe_* task: it gives the spawned experts their optimizer state (other tasks "
                  "warn, and refuse --fp16/--bf16)"},
    )
    evomoe_spawn_mode: str = field(
        default="mask",
        metadata={"help": "how experts are spawned from the base expert: mask (random binary mask), reinit (masked weights "
                  "re-initialised), noise (Gaussian noise), copy (exact copies)"},
    )
    evomoe_mask_ratio: float = field(default=0.5, metadata={"help": "mask/reinit spawn: fraction r of each expert's weights masked out (default 0.5)"})
    evomoe_mask_rescale: bool = field(default=False, metadata={"help": "mask spawn: rescale kept weights by 1/(1-r)"})
    evomoe_noise_scale: float = field(
        default=0.01, metadata={"help": "noise spawn: noise std relative to each weight matrix's std (default 0.01)"}
    )


def validate_spawn_options(args) -> None:
    if args.evomoe_spawn_mode not in SPAWN_MODES:
        raise ValueError(f"--evomoe-spawn-mode {args.evomoe_spawn_mode!r} is not valid; choose one of: {', '.join(SPAWN_MODES)}")
    if not 0 <= args.evomoe_mask_ratio < 1:
        raise ValueError(f"--evomoe-mask-ratio must be in [0, 1), got {args.evomoe_mask_ratio}")
    require_finite({"--evomoe-noise-scale": args.evomoe_noise_scale})
    if args.evomoe_noise_scale < 0:
        raise ValueError(f"--evomoe-noise-scale must be >= 0, got {args.evomoe_noise_scale}")
