"""`fairseq-train` under torchrun, on CPU (gloo) as well as on GPUs.

    torchrun --nproc_per_node 2 -m fairseq_evomoe.distributed.train DATA --user-dir fairseq_evomoe \
        --cpu --distributed-backend gloo ...

fairseq 0.12 reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) only when
`--distributed-world-size` is above 1, and then computes the device as `rank % cuda.device_count()`,
which divides by zero without GPUs; with the default world size (the GPU count, 1 on a CPU machine)
it silently ignores torchrun, and every process trains alone on the full data. This entry point turns
torchrun's environment into fairseq's explicit options (`--distributed-init-method env://
--distributed-world-size W --distributed-rank R --distributed-no-spawn --device-id LOCAL_RANK`) and
runs fairseq's own `fairseq_cli.train.cli_main`. Options given on the command line win; without
torchrun's environment the arguments pass through unchanged.
"""

import os
import sys
from typing import List


def torchrun_args(argv: List[str], env=os.environ) -> List[str]:
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return list(argv)
    if any(a.startswith("--distributed-init-method") for a in argv):
        return list(argv)
    generated = [
        ("--distributed-init-method", "env://"),
        ("--distributed-world-size", env["WORLD_SIZE"]),
        ("--distributed-rank", env["RANK"]),
        ("--distributed-no-spawn", None),
        ("--device-id", env.get("LOCAL_RANK", "0")),
    ]
    given = lambda option: any(a == option or a.startswith(option + "=") for a in argv)  # noqa: E731
    extra = []
    for option, value in generated:
        if not given(option):  # an option on the command line wins
            extra += [option] if value is None else [option, value]
    return list(argv) + extra


def main() -> None:
    sys.argv = [sys.argv[0]] + torchrun_args(sys.argv[1:])
    from fairseq_cli.train import cli_main

    cli_main()


if __name__ == "__main__":
    main()
