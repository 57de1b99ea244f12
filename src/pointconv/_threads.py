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
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def map_ordered(fn: Callable[[T], R], items: Iterable[T], device: torch.device) -> list[R]:
    """``[fn(item) for item in items]``, the items spread over ``torch.get_num_threads()`` threads
    on CPU (on other devices the ops are asynchronous already: one thread)."""
    items = list(items)
    workers = min(torch.get_num_threads(), len(items))
    if device.type != "cpu" or workers < 2:
        return [fn(item) for item in items]
    # one torch thread per worker: torch's own idle threads spin, which would steal the cores
    # from the other workers (set here, the count a new thread starts with; restored after)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)
