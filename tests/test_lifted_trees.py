"""Small clouds of a batch share one lifted kd-tree on CPU (neighbors/_trees.py): same answers.

Each test also asserts that the lifted tree is what answered (or, where it must not, that it was
not), so a change of the routing cannot make these tests pass vacuously.
"""
import pytest
import torch

import pointconv
import pointconv.neighbors._cpu as cpu
import pointconv.neighbors._search as search_module
from pointconv.neighbors import knn_reference
from pointconv.neighbors._trees import CloudTrees
from clouds import make_cloud


def assert_same(res, ref):
    assert torch.equal(res.idx, ref.idx)
    assert torch.equal(res.dists, ref.dists)


@pytest.fixture
def lifted_calls(monkeypatch):
    """Counts the searches answered by a lifted tree."""
    calls = []
    real = search_module._search_lifted

    def counting(*args, **kwargs):
        calls.append(args[3])  # the clouds it answered
        return real(*args, **kwargs)

    monkeypatch.setattr(search_module, "_search_lifted", counting)
    return calls


def _batch(kind, lengths, P, seed, dtype=torch.float32):
    x = make_cloud(kind, len(lengths), P, seed=seed, dtype=dtype)
    return x, torch.tensor(lengths)


@pytest.mark.parametrize("kind", ["uniform", "duplicated", "lattice", "clustered"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_batch_of_small_clouds(kind, exclude_self, lifted_calls):
    p, pl = _batch(kind, [300, 0, 7, 250, 1, 300], 300, seed=40)
    res = pointconv.knn(p, p, 12, query_lengths=pl, points_lengths=pl, exclude_self=exclude_self)
    assert_same(res, knn_reference(p, p, 12, query_lengths=pl, points_lengths=pl, exclude_self=exclude_self))
    assert lifted_calls == [[0, 2, 3, 4, 5]]
    q, ql = _batch(kind, [100, 40, 0, 90, 10, 100], 100, seed=41)
    res = pointconv.knn(q, p, 9, query_lengths=ql, points_lengths=pl)
    assert_same(res, knn_reference(q, p, 9, query_lengths=ql, points_lengths=pl))
    assert lifted_calls[-1] == [0, 3, 4, 5]


@pytest.mark.parametrize("kind", ["uniform", "duplicated", "lattice"])
def test_lifted_queries_in_order_and_pipelined(kind, monkeypatch, lifted_calls):
    """Enough queries for the Z-order (>= 4096) and, with a low threshold, the thread pool."""
    monkeypatch.setattr(cpu, "_PIPELINE_ROWS", 1000)
    monkeypatch.setattr(cpu, "_CHUNK_ROWS", 700)
    p = make_cloud(kind, 6, 800, seed=42)
    q = make_cloud(kind, 6, 900, seed=43)
    assert_same(pointconv.knn(q, p, 7), knn_reference(q, p, 7))  # Z-order by (cloud, code)
    assert_same(pointconv.knn(p, p, 7, exclude_self=True), knn_reference(p, p, 7, exclude_self=True))  # leaf order
    assert len(lifted_calls) == 2


def test_clouds_do_not_leak_into_each_other(lifted_calls):
    """Overlapping clouds of very different sizes: a small cloud gets its own points and padding."""
    p = torch.rand(3, 400, 3)
    pl = torch.tensor([5, 400, 2])
    res = pointconv.knn(p, p, 10, query_lengths=pl, points_lengths=pl)
    assert lifted_calls
    found = (res.idx >= 0).sum(-1)
    assert torch.equal(found[0, :5], torch.full((5,), 5)) and torch.equal(found[2, :2], torch.full((2,), 2))
    assert bool((res.idx < pl[:, None, None]).all())
    assert_same(res, knn_reference(p, p, 10, query_lengths=pl, points_lengths=pl))


def test_ball_query(lifted_calls):
    p = make_cloud("clustered", 4, 500, seed=44)
    q = make_cloud("clustered", 4, 300, seed=45)
    res = pointconv.ball_query(q, p, 0.15, 16)
    assert lifted_calls
    from pointconv.neighbors.ball_query import ball_query_reference

    assert_same(res, ball_query_reference(q, p, 0.15, 16))


def test_index_queries_outside_the_box_use_per_cloud_trees(lifted_calls):
    p = make_cloud("uniform", 5, 400, seed=46)
    index = pointconv.NeighborIndex(p)
    q = make_cloud("uniform", 5, 200, seed=47)
    assert_same(index.knn(q, 6), knn_reference(q, p, 6))
    assert len(lifted_calls) == 1
    far = q * 50 + 100  # outside the box the index sized from its points
    assert_same(index.knn(far, 6), knn_reference(far, p, 6))
    assert len(lifted_calls) == 1
    assert_same(index.ball_query(q, 0.2, 8), pointconv.ball_query(q, p, 0.2, 8))


def test_huge_float64_coordinates_are_not_lifted(lifted_calls):
    """Lifted coordinates whose squares would overflow float64: every cloud gets its own tree."""
    p = make_cloud("uniform", 3, 60, seed=48, dtype=torch.float64) * 3e153
    assert CloudTrees(p, [60, 60, 60]).lifted == []
    assert_same(pointconv.knn(p, p, 5), knn_reference(p, p, 5))
    assert not lifted_calls
    small = p / 1e140  # still large, well inside the limit
    assert CloudTrees(small, [60, 60, 60]).lifted == [0, 1, 2]
    assert_same(pointconv.knn(small, small, 5), knn_reference(small, small, 5))
    assert lifted_calls


def test_float32_coordinates_whose_squares_overflow_are_not_lifted(lifted_calls):
    p = make_cloud("uniform", 3, 60, seed=49) * 3e19  # squared distances overflow float32 to inf
    assert CloudTrees(p, [60, 60, 60]).lifted == []
    # the public searches refuse such coordinates (an overflowed distance would read as no neighbor)
    with pytest.raises(ValueError, match="coordinates beyond"):
        pointconv.knn(p, p, 5)
    assert not lifted_calls
