"""Where the chunked tasks run: threads of this process, or a Dask cluster, behind one small interface.

:func:`pipeline.chunked.run_chunked` drives every stage of ``register`` and every ``warp`` through an
:class:`Executor`; it does not know which one it has. Two implementations:

* :class:`ThreadExecutor` — a ``concurrent.futures`` thread pool in this process: no scheduler, no worker
  processes to start, stop or fill with imports, and nothing to send (tasks share this process's memory).
  numpy, SciPy, Zarr's codecs and torch release the GIL in their inner loops, so threads use the cores.
* :class:`DaskExecutor` — a ``distributed.Client`` (a local cluster of worker processes, a running
  scheduler, SLURM jobs; :func:`pipeline.cluster.open_client`).

The task graph of a stage is the same on both: block tasks, a ``piece`` of a block's result per chunk that
needs it (Dask runs that ``getitem`` where the block's result lives, so only pieces travel), and one task
per output chunk whose arguments hold those pieces. The thread pool runs tasks first in, first out, and a
task is submitted only after the tasks whose results it takes, so a task that waits for one of them waits
for a task that already runs or has finished: the pool cannot deadlock.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import operator
import os
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol


class Completions(Protocol):
    """Futures in the order they finish; more can be added while iterating."""

    def add(self, future: Any) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...


class Executor(Protocol):
    """What :func:`pipeline.chunked.run_chunked` needs from the place where tasks run.

    Attributes:
        kind: ``"threads"`` (this process) or the Dask cluster's kind (``"local"``, ``"address"``, ``"slurm"``).
        threads: task slots in all (bounds the chunk tasks in flight).
        gpu: network tasks must carry ``resources={"GPU": 1}``.
        dashboard: the Dask dashboard's address ("" for threads).
    """

    kind: str
    threads: int
    gpu: bool
    dashboard: str

    def share(self, value: Any) -> Any:
        """``value`` made available to every task (Dask: scattered to every worker once)."""
        ...

    def submit(self, fn: Callable[..., Any], *args: Any, key: str, resources: dict[str, float] | None = None) -> Any:
        """Run ``fn(*args)``; futures among ``args`` (also inside lists and tuples) are replaced by their results."""
        ...

    def piece(self, future: Any, index: Any, key: str) -> Any:
        """A future of ``future.result()[index]``."""
        ...

    def completions(self, futures: list[Any]) -> Completions:
        """:class:`Completions` over ``futures``."""
        ...

    def release(self, future: Any) -> None:
        """Drop ``future``'s result as soon as nothing else holds it."""
        ...


def machine_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class _Piece:
    """``future.result()[index]``, taken when a thread task's arguments are resolved (no task of its own)."""

    future: concurrent.futures.Future
    index: Any

    def result(self) -> Any:
        return self.future.result()[self.index]


def _resolve(value: Any) -> Any:
    """``value`` with futures and pieces (also inside lists and tuples) replaced by their results."""
    if isinstance(value, concurrent.futures.Future | _Piece):
        return value.result()
    if isinstance(value, list | tuple):
        return type(value)(_resolve(v) for v in value)
    return value


class _QueueCompletions:
    """:class:`Completions` of ``concurrent.futures`` futures through their done-callbacks."""

    def __init__(self, futures: list[concurrent.futures.Future]) -> None:
        self._done: queue.SimpleQueue[concurrent.futures.Future] = queue.SimpleQueue()
        self._pending = 0
        for future in futures:
            self.add(future)

    def add(self, future: concurrent.futures.Future) -> None:
        self._pending += 1
        future.add_done_callback(self._done.put)

    def __iter__(self) -> Iterator[concurrent.futures.Future]:
        while self._pending:
            future = self._done.get()
            self._pending -= 1
            yield future


class ThreadExecutor:
    """Tasks on a pool of ``threads`` threads of this process (see the module docstring).

    Torch's own intra-op threads are set so that the pool's threads together use the cores once:
    ``max(1, cores // threads)`` each (a forward pass on every pool thread at once must not oversubscribe).
    """

    kind = "threads"
    gpu = False
    dashboard = ""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, int(threads or machine_cores()))
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="patchmorph")
        self.torch_threads = max(1, machine_cores() // self.threads)
        self._torch_before: int | None = None

    def share(self, value: Any) -> Any:
        return value

    def submit(
        self, fn: Callable[..., Any], *args: Any, key: str, resources: dict[str, float] | None = None
    ) -> concurrent.futures.Future:
        return self._pool.submit(self._call, fn, args)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        import torch

        if torch.get_num_threads() != self.torch_threads:
            self._torch_before = self._torch_before or torch.get_num_threads()
            torch.set_num_threads(self.torch_threads)
        return fn(*_resolve(args))

    def piece(self, future: concurrent.futures.Future, index: Any, key: str) -> _Piece:
        return _Piece(future, index)

    def completions(self, futures: list[Any]) -> Completions:
        return _QueueCompletions(futures)

    def release(self, future: Any) -> None:
        return None

    def close(self) -> None:
        """Wait for running tasks, stop the threads and give torch back its thread count."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._torch_before is not None:
            import torch

            torch.set_num_threads(self._torch_before)


class DaskExecutor:
    """Tasks on a Dask cluster through ``client`` (see :func:`pipeline.cluster.open_client`)."""

    def __init__(self, client: Any, kind: str, dashboard: str, gpu: bool) -> None:
        self.client = client
        self.kind = kind
        self.dashboard = dashboard
        self.gpu = gpu

    @property
    def threads(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def share(self, value: Any) -> Any:
        return self.client.scatter(value, broadcast=True, hash=False)

    def submit(self, fn: Callable[..., Any], *args: Any, key: str, resources: dict[str, float] | None = None) -> Any:
        return self.client.submit(fn, *args, key=key, resources=resources)

    def piece(self, future: Any, index: Any, key: str) -> Any:
        return self.client.submit(operator.getitem, future, index, key=key)

    def completions(self, futures: list[Any]) -> Completions:
        from distributed import as_completed

        return as_completed(futures, loop=self.client.loop)  # this run's client, not a process-wide default

    def release(self, future: Any) -> None:
        future.release()


@contextlib.contextmanager
def thread_executor(threads: int | None = None) -> Iterator[ThreadExecutor]:
    """A :class:`ThreadExecutor` that is closed on exit."""
    executor = ThreadExecutor(threads)
    try:
        yield executor
    finally:
        executor.close()
