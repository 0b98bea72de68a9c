"""fairseq-evomoe: EvoMoE and mixture-of-experts baselines as a fairseq user dir.

Importing the package (fairseq does so for `--user-dir fairseq_evomoe`) registers the MoE
architectures, gates, criteria and phase-switching tasks, and allowlists the types fairseq stores
in checkpoints so that they load under torch's `weights_only=True` default.
"""

from .checkpoint_compat import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from . import moe  # noqa: E402,F401  (gates register themselves)
from . import evomoe  # noqa: E402,F401  (registers the EvoMoE model options)
from . import criterions, models, tasks  # noqa: E402,F401

__version__ = "0.1.0"
