"""A worker's process group, set up and torn down so that the process exits cleanly.

`torch._dynamo`, imported while a process group exists, keeps references to that group (torch.optim
imports it when the first optimizer is built, so every fairseq worker does). `destroy_process_group()`
then only forgets the group: its gloo worker threads keep running. At exit the interpreter
finalizes while such a thread may still be releasing the last reference to a finished collective's
tensors, which needs the GIL; the thread is then unwound inside a destructor, and the process
aborts with "terminate called without an active exception" after its work has succeeded.

Importing torch._dynamo before the group is created keeps it from holding the group, and
destroying the group then joins its threads while the interpreter is fully alive.
"""

import functools
import gc
import importlib
import os
from typing import List

import torch.distributed as dist


def before_process_group() -> None:
    """Call before `init_process_group`."""
    importlib.import_module("torch._dynamo")


def destroy_process_groups() -> None:
    """Destroys every process group of this process (after its last collective) and joins gloo's
    threads; a no-op without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # groups held only by reference cycles


def gloo_threads() -> List[str]:
    """Names of this process's threads that gloo started (Linux; empty elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if "gloo" in name:
            names.append(name)
    return names


def ending_cleanly(distributed_main):
    """fairseq's `distributed_main(i, main, cfg, kwargs)` (every distributed worker runs it), with
    torch._dynamo imported before the process group is created and every group destroyed after
    fairseq's closing barrier."""

    @functools.wraps(distributed_main)
    def run(i, main, cfg, kwargs):
        before_process_group()
        distributed_main(i, main, cfg, kwargs)
        destroy_process_groups()

    run.ends_cleanly = True
    return run
