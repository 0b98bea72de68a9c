"""Routing gates; importing this package registers its gates for `--moe-gate` (gates defined
elsewhere register themselves the same way, with `register_gate`)."""

from . import top_k  # noqa: F401
from . import balanced  # noqa: F401,E402
from . import hashing  # noqa: F401,E402
from . import stable  # noqa: F401,E402
from . import dense  # noqa: F401,E402
from .base import GATE_REGISTRY, Gate, Routing, build_gate, register_gate  # noqa: F401
