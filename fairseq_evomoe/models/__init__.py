from . import roberta_moe, transformer_lm_moe, transformer_moe  # noqa: F401  (fills fairseq's registries)
from . import evomoe_archs  # noqa: F401,E402
