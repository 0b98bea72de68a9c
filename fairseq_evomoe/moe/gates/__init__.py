"""Routing gates; importing this package registers every gate for `--moe-gate`."""

from . import top_k  # noqa: F401
from .base import GATE_REGISTRY, Gate, Routing, build_gate, register_gate  # noqa: F401
