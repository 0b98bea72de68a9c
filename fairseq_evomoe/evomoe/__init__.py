"""EvoMoE on top of the generic MoE layer (fairseq_evomoe/moe, which knows nothing of it):
the DTS gate, the expert-diversify phase, the schedule and the phase controller the tasks use."""

from . import dts_gate  # noqa: F401  (registers the `dts` gate)
from . import options  # noqa: F401  (registers the EvoMoE model options)
