from . import evomoe_tasks  # noqa: F401  (fills fairseq's task registry)
