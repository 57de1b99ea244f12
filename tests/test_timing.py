"""The benchmarks' timing helper."""
import weakref

from pointconv._timing import timed_ms


class _Result:
    pass


def test_each_run_starts_with_the_previous_result_released():
    """A held result would keep its graph (a forward's neighbor structures) alive while the next run
    allocates its own: the runs would measure page faults no training loop pays."""
    alive_at_start, results = [], []

    def run():
        alive_at_start.append(bool(results) and results[-1]() is not None)
        result = _Result()
        results.append(weakref.ref(result))
        return result

    ms, out = timed_ms(run, "cpu", repeat=3, warmup=2)
    assert alive_at_start == [False] * 5
    assert results[-1]() is out and len(results) == 5 and ms >= 0
