from . import options  # noqa: F401  (registers the EvoMoE model options)
