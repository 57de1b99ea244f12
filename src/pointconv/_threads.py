"""Independent CPU work items on every torch thread, results in input order.

Chains of small torch ops (gathers, cumsums, compactions, sorts of a few hundred thousand
elements) use one core for much of their time: several of these ops run on one thread, the rest
stop paying off their parallel overhead below a few hundred thousand elements. Work split into
independent items (chunks of centers, say) then runs one item per thread; torch releases the GIL
inside its ops. Results come back in the items' order, so the output does not depend on which
thread ran what.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


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
    if device.type != "cpu" or workers < 2:
        yield from map(fn, items)
        return
    # one torch thread per worker: torch's own idle threads spin, which would steal the cores
    # from the other workers (set here, the count a new thread starts with; restored after)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(fn, item) for item in items]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
