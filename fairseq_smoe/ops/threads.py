"""Independent pieces of CPU work run side by side, one per intra-op thread (the speed of paper §3 on CPU).

The MoE layer's CPU work comes in many small independent pieces: one expert's matrix products
(loop_experts.py), one block of rows of the gate's elementwise math (noisy_topk.py). Splitting each
small piece over T threads pays a thread barrier per operation, and on a shared, oversubscribed
CPU each barrier can wait for a descheduled thread (measured here: the same 32 products 2-3×
slower with 2 intra-op threads than with 1 under load). Running T pieces at once, each with
single-threaded kernels, pays no barrier until the end.

``run_parts(tasks)`` runs ``tasks[0]`` in this thread and the others in a small pool, each with
``torch.set_num_threads(1)`` and grad mode off (tasks write into preallocated tensors), waits for
all of them, restores the thread count and re-raises the first error. Pieces must not write to
the same memory. ``SMOE_EXPERT_THREADS=0`` in the environment turns this off (``parts()``
returns 1: one piece at a time with multi-threaded kernels).

``for_each_shared(num_items, work, device)`` hands the items out one at a time: each thread takes
the next one when it has finished its last, so no thread idles while another still has a queue.
Splitting the items into fixed runs up front instead left one core idle for 15-30 % of the
expert loop here (measured: 1024 experts of MoE-1024-h, one run finished 190 ms before the other
in a 680 ms forward), because an expert's cost is not proportional to its rows (streaming its
weights costs the same for 10 rows as for 60) and because the two vCPUs do not run at the same
speed.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence

import torch

ENABLED = os.environ.get("SMOE_EXPERT_THREADS", "1") not in ("0", "false", "no")

_executor: Optional[ThreadPoolExecutor] = None
_executor_workers = 0
_executor_pid = 0
_executor_lock = threading.Lock()


def _get_executor(workers: int) -> ThreadPoolExecutor:
    global _executor, _executor_workers, _executor_pid
    with _executor_lock:
        # A forked child inherits the pool object but not its threads: make a new one there.
        if _executor is None or _executor_workers < workers or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(workers, thread_name_prefix="smoe")
            _executor_workers, _executor_pid = workers, os.getpid()
        return _executor


def parts(device: torch.device) -> int:
    """How many pieces of work to run at once on ``device``: the intra-op thread count on CPU
    (when enabled), else 1 (GPU kernels are asynchronous and parallel on their own)."""
    if torch.device(device).type != "cpu" or not ENABLED:
        return 1
    return max(1, torch.get_num_threads())


def max_parts(device: Optional[torch.device] = None) -> int:
    """Most pieces ``run_parts`` runs at once (callers allocate scratch buffers per piece): the
    intra-op thread count on CPU, 1 on any other ``device`` (no per-thread scratch there)."""
    if device is not None and torch.device(device).type != "cpu":
        return 1
    return max(1, torch.get_num_threads()) if ENABLED else 1


def _run_single_threaded(task: Callable[[], None]) -> None:
    # Grad mode and the intra-op thread count are per thread; outputs are written with out=.
    with torch.no_grad():
        torch.set_num_threads(1)
        task()


def run_parts(tasks: Sequence[Callable[[], None]]) -> None:
    """Run the tasks concurrently (see the module docstring); one task runs inline as is."""
    tasks = list(tasks)
    if len(tasks) <= 1:
        for task in tasks:
            task()
        return
    threads = torch.get_num_threads()
    executor = _get_executor(len(tasks) - 1)
    futures = [executor.submit(_run_single_threaded, task) for task in tasks[1:]]
    errors: List[BaseException] = []
    try:
        _run_single_threaded(tasks[0])
    except BaseException as error:  # noqa: B036 - re-raised below, after the others finished
        errors.append(error)
    finally:
        for future in futures:  # always wait: the pool threads write into shared buffers
            try:
                future.result()
            except BaseException as error:  # noqa: B036 - re-raised below
                errors.append(error)
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]


def for_each_shared(num_items: int, work: Callable[[int, int], None], device: torch.device) -> None:
    """``work(part, i)`` for i = 0, 1, ..., num_items - 1, ``part`` being the index of the thread
    that runs it (for per-thread scratch buffers, ``part < max_parts()``). Items are taken in
    order from one shared counter by ``parts(device)`` threads (``run_parts``); give the costly
    ones the low indices so that the last items to finish are short."""
    num_parts = min(parts(device), num_items)
    if num_parts < 2:
        for i in range(num_items):
            work(0, i)
        return
    next_item = iter(range(num_items))
    lock = threading.Lock()

    def run(part: int):
        def task():
            while True:
                with lock:
                    i = next(next_item, None)
                if i is None:
                    return
                work(part, i)
        return task

    run_parts([run(part) for part in range(num_parts)])


def for_each(items: Sequence, work: Callable[[int, object], None], device: torch.device) -> None:
    """``work(i, items[i])`` for every item, spread over the threads (``for_each_shared``)."""
    for_each_shared(len(items), lambda part, i: work(i, items[i]), device)
