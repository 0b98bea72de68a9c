"""Expert parallelism: each worker holds a slice of every MoE layer's experts and tokens travel to
them by all_to_all. The modules depend on `placement` (arithmetic) and `collectives` only:

    placement.py        which experts each worker holds
    collectives.py      differentiable all_to_all, gather to rank 0
    exchange.py         run a layer's experts over the workers; gradient scaling
    sharding.py         keep this worker's experts of a fully built layer
    checkpoint.py       full experts in checkpoints, each worker's slice on load; DDP exclusion
    optimizer_state.py  full optimizer state in checkpoints, each worker's slice on load
    grad_norm.py        the gradient norm with each expert counted once

`models/moe_stack.py` installs the checkpoint hooks and (fairseq_evomoe/patches.py) the global
wraps explicitly when it builds a layer under expert parallelism.
"""
