from . import moe_criterions  # noqa: F401  (fills fairseq's criterion registry)
