"""Run test code on several ranks of a CPU (gloo) process group.

Starting a process that imports torch costs seconds (tens of seconds on a loaded 2-core CI
machine), so the ranks are worker processes started once per pytest session and reused: a test
sends a function to every rank and gets each rank's return value back.

    # in a test module (the function must be module-level: it is sent by reference)
    def _body(n):
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        ...
        return something_picklable              # e.g. floats, CPU tensors

    def test_it(dist_workers):                   # fixture of conftest.py: 2 ranks
        per_rank = dist_workers.run(_body, 3)    # [rank 0's return value, rank 1's]

Each worker has initialised the default process group (gloo, ``world_size`` ranks, 120 s
collective timeout), runs with one intra-op thread (the ranks share the machine's cores), has
imported ``bigkernels``, and runs jobs one at a time in the order sent. Needing fewer ranks, a
job calls ``dist.new_group(ranks)`` on every rank (a collective) and works on the subgroup where
it belongs (``DeviceMesh.from_group``). Global state a job changes (mask registry, seeds, env)
stays changed for the next job: reset what you touch. If any rank raises, or the job runs past
its timeout, the workers are stopped (their process group may be stuck in a collective) and the
error shows every failing rank's traceback; the next ``run`` starts fresh workers.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class DistributedJobError(AssertionError):
    """A job failed on at least one rank (message: each failing rank's traceback)."""


def _worker(rank: int, world_size: int, store_path: str, jobs, results, env: Dict[str, str]) -> None:
    os.environ.update(env)
    try:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120))
        import bigkernels  # noqa: F401  (ops defined, extension loaded, as in the test process)
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    results.put((rank, "ready", None))
    while True:
        job = jobs.get()
        if job is None:
            break
        try:
            fn, args, kwargs = job
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class DistWorkers:
    """``world_size`` worker processes forming a gloo process group; see the module docstring."""

    def __init__(self, world_size: int = 2, timeout_s: float = 300.0, start_timeout_s: float = 300.0,
                 env: Optional[Dict[str, str]] = None):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.env = dict(WORKER_ENV, **(env or {}))
        self._procs: List[mp.Process] = []
        self._jobs: list = []
        self._results = None
        self._tmp: Optional[str] = None

    # ----- lifecycle ----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        if self.alive:
            return
        self.close()
        ctx = mp.get_context("spawn")  # never fork a process that may hold torch's thread pools
        self._tmp = tempfile.mkdtemp(prefix="bk_dist_")
        store = os.path.join(self._tmp, "store")
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, store, self._jobs[r], self._results,
                                                          self.env), daemon=True, name=f"bk-dist-rank{r}")
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        self._collect("ready", self.start_timeout_s, what="starting the workers")

    def close(self) -> None:
        """Stop the workers (politely, then by force) and remove their files."""
        for q in self._jobs:
            try:
                q.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        self._procs, self._jobs, self._results = [], [], None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # ----- jobs -----------------------------------------------------------------------------------
    def run(self, fn: Callable, *args, timeout_s: Optional[float] = None, **kwargs) -> List[Any]:
        """``fn(*args, **kwargs)`` on every rank; returns the ranks' return values, in rank order.
        ``fn`` must be importable by name (a module-level function); args and results are
        pickled."""
        self.start()
        for q in self._jobs:
            q.put((fn, args, kwargs))
        return self._collect("ok", self.timeout_s if timeout_s is None else timeout_s,
                             what=f"{getattr(fn, '__qualname__', fn)}")

    def _collect(self, expect: str, timeout_s: float, what: str) -> List[Any]:
        out: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) + len(errors) < self.world_size:
            # Once a rank failed, the others may wait forever in a collective: give them a little
            # time to report their own error, then stop everyone.
            left = deadline - time.monotonic() if not errors else min(deadline - time.monotonic(), 15.0)
            try:
                rank, status, value = self._results.get(timeout=max(0.1, left))
            except queue.Empty:
                if left <= 0.1 or errors or not self.alive:
                    break
                continue
            if status == expect:
                out[rank] = value
            else:
                errors[rank] = value
        if len(out) == self.world_size:
            return [out[r] for r in range(self.world_size)]
        missing = [r for r in range(self.world_size) if r not in out and r not in errors]
        self.close()
        parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
        if missing:
            parts.append(f"ranks {missing}: no answer within {timeout_s:.0f} s (stuck or died)")
        raise DistributedJobError(f"{what} failed:\n" + "\n".join(parts))
