"""A pool of worker processes in one process group (gloo on CPU; nccl, one GPU per rank), kept for a test
module, so that each parallel test costs a task, not a process start (starting two processes that import
torch and diffusers takes ~15 s here).

``Pool(world_size).run(fn, *args)`` calls ``fn(*args)`` on every rank and returns the results in rank order;
``fn`` must be importable by name (a module-level function of a test module) and its arguments and result
picklable. An exception on any rank is raised here with that rank's traceback. A task that does not end
within ``timeout`` (a rank waiting on a collective the others never join) fails the test and the pool.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Pool:
    def __init__(self, world_size: int, backend: str = "gloo", timeout: float = 120.0):
        context = mp.get_context("spawn")
        self.world_size, self.timeout = world_size, timeout
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        port = _free_port()
        self.processes = [context.Process(target=_worker, args=(rank, world_size, port, backend, self.tasks[rank],
                                                                 self.results), daemon=True)
                          for rank in range(world_size)]  # fmt: skip
        for process in self.processes:
            process.start()
        self.broken = False

    def run(self, fn: Callable, *args) -> list:
        if self.broken:
            raise RuntimeError("the worker pool broke in an earlier task")
        for tasks in self.tasks:
            tasks.put((fn, args))
        results, errors = [None] * self.world_size, {}
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.results.get(timeout=self.timeout)
            except queue.Empty:
                self.broken = True
                raise TimeoutError(f"{fn.__name__}: no result within {self.timeout} s (a rank waits on a collective?)")
            results[rank] = value
            if not ok:
                errors[rank] = value
        if errors:
            rank = min(errors)
            raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{errors[rank]}")
        return results

    def close(self) -> None:
        for tasks in self.tasks:
            tasks.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def _worker(rank: int, world_size: int, port: int, backend: str, tasks, results) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=90))  # fmt: skip
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


