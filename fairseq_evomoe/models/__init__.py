from . import roberta_moe, transformer_lm_moe, transformer_moe  # noqa: F401  (fills fairseq's registries)
