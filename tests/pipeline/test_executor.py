"""The thread executor: dependencies passed as futures and pieces, completion order, no deadlock on one
thread, torch's thread count given back."""

from __future__ import annotations

import threading
import time

import torch

from pipeline.executor import ThreadExecutor, thread_executor


def _block(n: int) -> dict:
    time.sleep(0.01 * (n % 3))
    return {"a": n, "b": 10 * n, "thread": threading.current_thread().name}


def _chunk(parts: list[tuple[str, int]], scale: int) -> int:
    return scale * sum(value for _, value in parts)


def test_tasks_take_results_of_earlier_tasks_and_complete_in_any_order() -> None:
    for threads in (1, 3):  # one thread: a task waits only for tasks submitted (hence started) before it
        with thread_executor(threads) as executor:
            blocks = [executor.submit(_block, n, key=f"b{n}") for n in range(6)]
            chunks = {}
            for n in range(5):
                parts = [("a", executor.piece(blocks[n], "a", key="")), ("b", executor.piece(blocks[n + 1], "b", key=""))]
                chunks[executor.submit(_chunk, parts, 2, key=f"c{n}")] = n
            first, rest = list(chunks)[:2], list(chunks)[2:]
            queue = executor.completions(first)
            seen = {}
            for future in queue:
                seen[chunks[future]] = future.result()
                if rest:
                    queue.add(rest.pop())
            assert seen == {n: 2 * (n + 10 * (n + 1)) for n in range(5)}
            names = {f.result()["thread"] for f in blocks}
            assert all(name.startswith("patchmorph") for name in names) and len(names) <= threads


def test_torch_threads_share_the_cores_and_are_given_back() -> None:
    before = torch.get_num_threads()
    executor = ThreadExecutor(2)
    seen = executor.submit(torch.get_num_threads, key="t").result()
    executor.close()
    assert seen == executor.torch_threads == max(1, executor.torch_threads)
    assert torch.get_num_threads() == before
