"""map_ordered: results in input order, every torch thread used on CPU, torch's thread count restored."""
import threading
import time

import pytest
import torch

from pointconv._threads import imap_ordered, map_ordered


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_results_keep_the_input_order_across_threads(two_threads):
    ran_on, inner_threads = set(), set()

    def work(k):
        time.sleep(0.02 * (k % 3))  # later items finish first on the other thread
        ran_on.add(threading.get_ident())
        inner_threads.add(torch.get_num_threads())
        return torch.full((k + 1,), k).sum().item()

    assert map_ordered(work, range(8), torch.device("cpu")) == [k * (k + 1) for k in range(8)]
    assert len(ran_on) == 2 and threading.get_ident() not in ran_on
    assert inner_threads == {1}  # one torch thread per worker
    assert torch.get_num_threads() == 2


def test_one_thread_or_one_item_runs_inline():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ran_on = []
        assert map_ordered(lambda k: ran_on.append(threading.get_ident()) or -k, [1, 2, 3],
                           torch.device("cpu")) == [-1, -2, -3]
        assert set(ran_on) == {threading.get_ident()}
    finally:
        torch.set_num_threads(before)
    assert map_ordered(lambda k: threading.get_ident(), [0], torch.device("cpu")) == [threading.get_ident()]


def test_errors_propagate_and_the_thread_count_is_restored(two_threads):
    def work(k):
        if k == 3:
            raise ValueError("item 3")
        return k

    with pytest.raises(ValueError, match="item 3"):
        map_ordered(work, range(6), torch.device("cpu"))
    assert torch.get_num_threads() == 2


def test_the_iterator_runs_ahead_and_restores_the_thread_count_when_closed(two_threads):
    done = []

    def work(k):
        done.append(k)
        return k

    results = imap_ordered(work, range(6), torch.device("cpu"))
    assert next(results) == 0
    assert torch.get_num_threads() == 1  # the caller works with one torch thread meanwhile
    results.close()
    assert torch.get_num_threads() == 2


def test_pointwise_neighbors_leaves_the_thread_count_as_it_was(two_threads):
    from pointconv.conv.pointwise import pointwise_neighbors

    points = torch.rand(2, 3000, 3, generator=torch.Generator().manual_seed(0))
    built = pointwise_neighbors(points, 0.1, [1, 2])
    assert [n.dilation for n in built] == [1, 2] and torch.get_num_threads() == 2


def test_workers_can_exceed_torch_threads():
    """Work outside torch (scipy's tree queries) sizes its own pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ran_on = set()

        def work(k):
            time.sleep(0.02)
            ran_on.add(threading.get_ident())
            return k

        assert list(imap_ordered(work, range(6), torch.device("cpu"), workers=2)) == list(range(6))
        assert len(ran_on) == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_work_items_that_map_again_run_inline_instead_of_waiting_on_the_pool(two_threads):
    """The pool is shared: a work item waiting on more items of the same pool could deadlock."""
    def inner(k):
        return list(imap_ordered(lambda j: (j, threading.get_ident()), range(4), torch.device("cpu"), workers=2))

    result = []
    runner = threading.Thread(target=lambda: result.append(map_ordered(inner, range(4), torch.device("cpu"))))
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "nested map_ordered deadlocked"
    for k, inner_result in enumerate(result[0]):
        assert [j for j, _ in inner_result] == [0, 1, 2, 3]
        assert len({ident for _, ident in inner_result}) == 1  # inline, on the worker that ran item k


def _child_maps(queue):
    queue.put(map_ordered(lambda k: k * k, range(6), torch.device("cpu")))


def test_a_forked_child_gets_its_own_pool(two_threads):
    """A fork copies the pool objects but not their threads: the child must not queue work on them."""
    import multiprocessing

    assert map_ordered(lambda k: k, range(4), torch.device("cpu")) == [0, 1, 2, 3]  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_maps, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("map_ordered hung in a forked child")
    assert queue.get(timeout=5) == [k * k for k in range(6)]


@pytest.mark.parametrize("grad", [False, True])
def test_items_run_in_the_callers_grad_mode(two_threads, grad):
    # grad mode is per thread: an autograd Function's forward (no grad) that spreads work over the
    # pool must not have its items record graphs, nor refuse out= ops on tensors requiring grad
    x = torch.ones(3, requires_grad=True)

    def item(_):
        time.sleep(0.01)  # keep both workers busy
        return torch.is_grad_enabled(), (x * 2).requires_grad

    with torch.set_grad_enabled(grad):
        assert map_ordered(item, range(4), torch.device("cpu")) == [(grad, grad)] * 4
