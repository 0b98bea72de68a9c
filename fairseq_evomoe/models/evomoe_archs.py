"""Named EvoMoE variants: the MoE architectures with the DTS gate and an expert-diversify phase.

Defaults (our choice where the paper gives none; all overridable on the command line):
T_div = 10% of --max-update, temperature 2.0 -> 0.5 linearly over the next 50%, top-1 from then on.
They need --max-update (the phases are fractions of it) and an evomoe_* task.
"""

from fairseq.models import register_model_architecture

from . import roberta_moe, transformer_lm_moe, transformer_moe


def evomoe_defaults(args):
    args.moe_gate = getattr(args, "moe_gate", "dts")
    args.evomoe_diversify_updates = getattr(args, "evomoe_diversify_updates", 0.1)
    if args.moe_gate == "dts":
        args.dts_anneal_updates = getattr(args, "dts_anneal_updates", 0.5)


def _variant(model: str, name: str, base):
    @register_model_architecture(model, name)
    def arch(args):
        evomoe_defaults(args)
        base(args)

    arch.__name__ = name
    arch.__doc__ = f"{base.__name__} with EvoMoE defaults (DTS gate, expert-diversify)."
    return arch


for _model, _name, _base in [
    ("transformer_moe", "transformer_evomoe", transformer_moe.base_moe_architecture),
    ("transformer_moe", "transformer_evomoe_tiny", transformer_moe.transformer_moe_tiny),
    ("transformer_moe", "transformer_evomoe_iwslt_de_en", transformer_moe.transformer_moe_iwslt_de_en),
    ("transformer_moe", "transformer_evomoe_wmt_en_de_big", transformer_moe.transformer_moe_wmt_en_de_big),
    ("transformer_lm_moe", "transformer_lm_evomoe", transformer_lm_moe.base_lm_moe_architecture),
    ("transformer_lm_moe", "transformer_lm_evomoe_tiny", transformer_lm_moe.transformer_lm_moe_tiny),
    ("transformer_lm_moe", "transformer_lm_evomoe_gpt_small", transformer_lm_moe.transformer_lm_moe_gpt_small),
    ("transformer_lm_moe", "transformer_lm_evomoe_gpt_medium", transformer_lm_moe.transformer_lm_moe_gpt_medium),
    ("roberta_moe", "roberta_evomoe", roberta_moe.base_roberta_moe_architecture),
    ("roberta_moe", "roberta_evomoe_tiny", roberta_moe.roberta_moe_tiny),
    ("roberta_moe", "roberta_evomoe_base", roberta_moe.roberta_moe_base),
    ("roberta_moe", "roberta_evomoe_large", roberta_moe.roberta_moe_large),
]:
    _variant(_model, _name, _base)
