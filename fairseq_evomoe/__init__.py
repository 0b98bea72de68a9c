"""fairseq-evomoe: EvoMoE and mixture-of-experts baselines as a fairseq user dir.

Importing the package (fairseq does so for `--user-dir fairseq_evomoe`) registers the MoE
architectures, gates, criteria and phase-switching tasks, and allowlists the types fairseq stores
in checkpoints so that they load under torch's `weights_only=True` default (patches.py lists
everything the package changes in fairseq and torch).
"""

from . import patches

patches.install_at_import()

from . import moe  # noqa: E402,F401  (the baseline gates register themselves)
from . import evomoe  # noqa: E402,F401  (registers the DTS gate and the EvoMoE model options)
from . import criterions, models, tasks  # noqa: E402,F401

__version__ = "0.1.0"
