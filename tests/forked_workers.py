"""Worker processes for the multi-process tests, forked instead of spawned.

torch.multiprocessing.spawn starts every worker as a fresh interpreter that imports torch (and,
in most checks, fairseq) again. `run_workers(fn, args, nprocs)` runs this file through the fork
server's `python` (conftest.python_for_scripts): a process with the imports done and no thread
pool started yet, which forks the workers, so they start at once. A worker's exception fails the
test with the worker's traceback. `fn(rank, *args)` as for torch.multiprocessing.spawn; fn and args
are pickled (module-level functions of the test modules)."""

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path


def run_workers(fn, args: tuple, nprocs: int, timeout: int = 600, fresh: bool = False) -> None:
    """fresh: fork the workers from a fresh interpreter instead (nothing imported but this file's
    imports and what fn's module needs), for a test about what a fresh process has imported."""
    from conftest import REPO, python_for_scripts

    with tempfile.TemporaryDirectory() as d:
        job = Path(d, "job.pkl")
        job.write_bytes(pickle.dumps((fn, args, nprocs)))
        proc = subprocess.run([sys.executable if fresh else python_for_scripts(), __file__, str(job)], capture_output=True, text=True,
                              timeout=timeout, cwd=str(REPO), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise AssertionError(f"a worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")


if __name__ == "__main__":
    import torch.multiprocessing as mp

    fn, args, nprocs = pickle.loads(Path(sys.argv[1]).read_bytes())
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="fork")
