"""Independent CPU work items on every torch thread, results in input order.

Chains of small torch ops (gathers, cumsums, compactions, sorts of a few hundred thousand
elements) use one core for much of their time: several of these ops run on one thread, the rest
stop paying off their parallel overhead below a few hundred thousand elements. Work split into
independent items (chunks of centers, say) then runs one item per thread; torch releases the GIL
inside its ops. Results come back in the items' order, so the output does not depend on which
thread ran what.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# One pool per worker count, kept for the process: a fresh pool per call cost 0.5-3 ms in thread
# start-ups and in the per-thread set-up of torch's kernels, paid by every parallel op.
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_pid = os.getpid()
_pools_lock = threading.Lock()
_in_worker = threading.local()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads (each item sets one torch thread in its own
    thread: ``_run_in_worker``). A forked child gets new pools: it inherits the pool objects but
    not their threads."""
    global _pools, _pools_pid
    with _pools_lock:
        if _pools_pid != os.getpid():
            _pools, _pools_pid = {}, os.getpid()
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pointconv")
        return _pools[workers]


def _run_in_worker(fn, item, grad_enabled: bool, fwd_grad_enabled: bool):
    # Work items that call map_ordered themselves run their items inline: they would otherwise
    # wait on the same pool's threads, which may all be waiting too. Autograd's grad modes are
    # per thread: the item runs in its caller's (an autograd Function's forward runs without
    # grad and without forward-mode AD, and so must its items: out= ops refuse dual tensors).
    _in_worker.active = True
    # One torch thread, said in this thread: a pool thread's torch.get_num_threads() reads 1, but
    # MKL in it could still split a GEMM's reduction over two threads (a weight gradient's bits then
    # depended on the thread count; measured). 0.15 us per call.
    torch.set_num_threads(1)
    fwd_before = torch._C._is_fwd_grad_enabled()
    torch._C._set_fwd_grad_enabled(fwd_grad_enabled)
    try:
        with torch.set_grad_enabled(grad_enabled):
            return fn(item)
    finally:
        torch._C._set_fwd_grad_enabled(fwd_before)
        _in_worker.active = False


def map_ordered(fn: Callable[[T], R], items: Iterable[T], device: torch.device) -> list[R]:
    """``[fn(item) for item in items]``, the items spread over ``torch.get_num_threads()`` threads
    on CPU (on other devices the ops are asynchronous already: one thread)."""
    return list(imap_ordered(fn, items, device))


def imap_ordered(fn: Callable[[T], R], items: Iterable[T], device: torch.device,
                 workers: int | None = None) -> Iterator[R]:
    """``map_ordered`` as an iterator: the threads run ahead of the caller, who can work on the
    results that are in (with one torch thread, until the iterator is exhausted or closed) while
    the next ones are computed. ``workers``: the threads (default ``torch.get_num_threads()``;
    work outside torch, such as scipy's, may use more)."""
    items = list(items)
    workers = min(torch.get_num_threads() if workers is None else workers, len(items))
    if device.type != "cpu" or workers < 2 or getattr(_in_worker, "active", False):
        yield from map(fn, items)
        return
    # one torch thread per worker: torch's own idle threads spin, which would steal the cores
    # from the other workers (set here, the count a new thread starts with; restored after)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    futures = []
    try:
        pool = _pool(workers)
        grad_enabled, fwd_grad_enabled = torch.is_grad_enabled(), torch._C._is_fwd_grad_enabled()
        futures = [pool.submit(_run_in_worker, fn, item, grad_enabled, fwd_grad_enabled) for item in items]
        for future in futures:
            yield future.result()
    finally:
        # on an error or an early close: drop the items not started, wait for the running ones
        for future in futures:
            future.cancel()
        wait(futures)
        torch.set_num_threads(threads)
