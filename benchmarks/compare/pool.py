"""Running the comparison's runs a few at a time (--jobs): threads, each waiting on its own
subprocess, with a progress line after every run trained now and the list of runs that failed."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple

from .commands import log

Job = Tuple[str, str, int]  # (task, gate, seed)


def run_all(jobs: List[Job], run: Callable[[int, str, str, int], dict], workers: int) -> Tuple[List[dict], List[str]]:
    """(results in the order of `jobs`, "task gate seed k" of every failed run) after calling
    run(index, task, gate, seed) for every job, `workers` at a time; index counts from 1. A run that
    raises RuntimeError is reported and counted as failed; the others go on."""
    t0 = time.time()
    failed, trained, finished = [], 0, 0
    lock = threading.Lock()

    def job(i: int, t: str, g: str, s: int) -> Optional[dict]:
        nonlocal trained, finished
        t_run = time.time()
        try:
            res = run(i, t, g, s)
        except RuntimeError as e:
            res = None
            log(f"[{i}/{len(jobs)}] {t} {g} seed {s}: FAILED: {e}")
        with lock:
            finished += 1
            if res is None:
                failed.append(f"{t} {g} seed {s}")
            if time.time() - t_run > 1:  # trained now (not a run finished earlier)
                trained += 1
                done = time.time() - t0
                log(f"    elapsed {done / 60:.1f} min, about {done / trained * (len(jobs) - finished) / 60:.1f} min left")
        return res

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = [r for r in pool.map(lambda j: job(*j), [(i, *tgs) for i, tgs in enumerate(jobs, 1)]) if r is not None]
    return results, failed
