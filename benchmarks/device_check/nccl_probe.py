"""Can NCCL run two ranks on the same GPU? Started by torchrun with 2 processes, both on cuda:0:
each joins an NCCL process group and all-reduces one tensor; prints "nccl all_reduce ok" on rank 0
when that worked. NCCL normally refuses two ranks on one device, in which case this exits non-zero
with NCCL's error, and the device check runs its expert-parallel section with gloo instead.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/device_check/nccl_probe.py
"""

import datetime
import os

import torch
import torch.distributed as dist


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=30))
    x = torch.full((1,), rank + 1.0, device="cuda:0")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    world = dist.get_world_size()
    assert x.item() == world * (world + 1) / 2, x.item()
    if rank == 0:
        print(f"nccl all_reduce ok: {world} ranks on cuda:0, sum {x.item():.0f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
