"""`python -m fairseq_evomoe.distributed.train` (fairseq-train under torchrun) with fairseq's own check
that every worker computed the same gradient norm switched on. fairseq runs that check only on
CUDA (`Trainer._grad_norm_buf` is a CUDA tensor, else None); here it gets a CPU buffer, so a CPU
test with gloo workers stops with fairseq's "gradients are inconsistent between workers" error
whenever the norms differ."""

import torch
from fairseq.trainer import Trainer

_init = Trainer.__init__


def _init_with_check(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.data_parallel_world_size > 1 and self._grad_norm_buf is None:
        self._grad_norm_buf = torch.zeros(self.data_parallel_world_size, dtype=torch.double)
        print(f"checked_train: gradient-norm consistency check on (rank {self.data_parallel_rank})", flush=True)


Trainer.__init__ = _init_with_check

if __name__ == "__main__":
    from fairseq_evomoe.distributed.train import main

    main()
