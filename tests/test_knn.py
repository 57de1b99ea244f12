import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.spatial import cKDTree

import pointconv
from pointconv.neighbors import knn_reference
from clouds import KINDS, make_cloud


def assert_same(res, ref):
    assert torch.equal(res.idx, ref.idx)
    assert torch.equal(res.dists, ref.dists)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 8, 16])
def test_knn_matches_reference(kind, k, device):
    q = make_cloud(kind, 2, 300, seed=1, device=device)
    p = make_cloud(kind, 2, 400, seed=2, device=device)
    assert_same(pointconv.knn(q, p, k), knn_reference(q, p, k))


@pytest.mark.parametrize("kind", KINDS)
def test_self_knn_exclude_self(kind, device):
    p = make_cloud(kind, 2, 500, seed=3, device=device)
    res = pointconv.knn(p, p, 10, exclude_self=True)
    assert_same(res, knn_reference(p, p, 10, exclude_self=True))
    rows = torch.arange(500, device=device)[None, :, None]
    assert not bool((res.idx == rows).any())


@pytest.mark.parametrize("kind", ["duplicated", "lattice", "uniform"])
def test_many_queries_in_z_order(kind):
    q = make_cloud(kind, 1, 5000, seed=20)
    p = make_cloud(kind, 1, 1000, seed=21)
    assert_same(pointconv.knn(q, p, 6), knn_reference(q, p, 6))
    assert_same(pointconv.knn(q[:, :1000], p, 6, exclude_self=True), knn_reference(q[:, :1000], p, 6, exclude_self=True))


@pytest.mark.parametrize("kind", ["duplicated", "lattice", "uniform"])
def test_pipelined_chunks_on_threads(kind, monkeypatch):
    """The thread pool path (many queries): tree queries run ahead, chunks finished in order."""
    import pointconv.neighbors._cpu as cpu

    monkeypatch.setattr(cpu, "_PIPELINE_ROWS", 100)
    monkeypatch.setattr(cpu, "_CHUNK_ROWS", 300)
    monkeypatch.setattr(cpu, "_THREADS", 2)
    q = make_cloud(kind, 1, 5000, seed=22)
    p = make_cloud(kind, 1, 1000, seed=23)
    threads = torch.get_num_threads()
    assert_same(pointconv.knn(q, p, 6), knn_reference(q, p, 6))
    assert_same(pointconv.knn(p, p, 5, exclude_self=True), knn_reference(p, p, 5, exclude_self=True))
    assert torch.get_num_threads() == threads


def test_without_exclude_self_a_point_is_its_own_nearest():
    p = make_cloud("uniform", 1, 200, seed=4)
    res = pointconv.knn(p, p, 1)
    assert torch.equal(res.idx[0, :, 0], torch.arange(200))
    assert bool((res.dists == 0).all())


@pytest.mark.parametrize("D", [1, 2, 5, 12])
def test_other_dimensions(D, device):
    q = make_cloud("uniform", 2, 100, D, seed=5, device=device)
    p = make_cloud("uniform", 2, 150, D, seed=6, device=device)
    assert_same(pointconv.knn(q, p, 7), knn_reference(q, p, 7))


def test_float64(device):
    q = make_cloud("clustered", 2, 200, seed=7, dtype=torch.float64, device=device)
    p = make_cloud("clustered", 2, 300, seed=8, dtype=torch.float64, device=device)
    assert_same(pointconv.knn(q, p, 12), knn_reference(q, p, 12))


def test_ragged_lengths_and_padding(device):
    q = make_cloud("uniform", 3, 60, seed=9, device=device)
    p = make_cloud("uniform", 3, 80, seed=10, device=device)
    ql = torch.tensor([60, 10, 0], device=device)
    pl = torch.tensor([5, 80, 30], device=device)
    res = pointconv.knn(q, p, 8, query_lengths=ql, points_lengths=pl)
    assert_same(res, knn_reference(q, p, 8, query_lengths=ql, points_lengths=pl))
    # cloud 0 has 5 points: slots 5..7 are padding
    assert bool((res.idx[0, :, 5:] == -1).all()) and bool(torch.isinf(res.dists[0, :, 5:]).all())
    assert bool((res.idx[0, :, :5] >= 0).all())
    # padded queries get nothing; never an index past the cloud's length
    assert bool((res.idx[1, 10:] == -1).all()) and bool((res.idx[2] == -1).all())
    assert int(res.idx[1].max()) < 80 and int(res.idx[0].max()) < 5


def test_k_larger_than_n_and_single_point(device):
    p = make_cloud("uniform", 1, 1, seed=11, device=device)
    q = make_cloud("uniform", 1, 4, seed=12, device=device)
    res = pointconv.knn(q, p, 3)
    assert torch.equal(res.idx[..., 0], torch.zeros(1, 4, dtype=torch.int64, device=device))
    assert bool((res.idx[..., 1:] == -1).all())
    assert torch.allclose(res.dists[..., 0], ((q - p) ** 2).sum(-1))
    res = pointconv.knn(p, p, 2, exclude_self=True)
    assert bool((res.idx == -1).all()) and bool(torch.isinf(res.dists).all())


def test_empty_clouds(device):
    q = torch.zeros(2, 0, 3, device=device)
    p = make_cloud("uniform", 2, 10, seed=13, device=device)
    res = pointconv.knn(q, p, 4)
    assert res.idx.shape == (2, 0, 4) and res.dists.shape == (2, 0, 4)
    res = pointconv.knn(p, torch.zeros(2, 0, 3, device=device), 4)
    assert res.idx.shape == (2, 10, 4) and bool((res.idx == -1).all())
    res = pointconv.knn(torch.zeros(0, 5, 3, device=device), torch.zeros(0, 5, 3, device=device), 2)
    assert res.idx.shape == (0, 5, 2)


@pytest.mark.parametrize("kind", ["uniform", "clustered", "surface"])
def test_distances_match_scipy_ckdtree(kind):
    q = make_cloud(kind, 1, 5000, seed=14, dtype=torch.float64)  # >= 4096: queries sent in Z-order
    p = make_cloud(kind, 1, 3000, seed=15, dtype=torch.float64)
    res = pointconv.knn(q, p, 16)
    d, i = cKDTree(p[0].numpy()).query(q[0].numpy(), k=16)
    np.testing.assert_allclose(res.dists[0].numpy(), d ** 2, rtol=1e-12, atol=1e-15)
    # Where scipy's k nearest are unambiguous, the index sets agree.
    np.testing.assert_array_equal(np.sort(res.idx[0].numpy(), 1), np.sort(i, 1))


def test_dists_are_differentiable():
    q = make_cloud("uniform", 2, 6, seed=16, dtype=torch.float64).requires_grad_()
    p = make_cloud("uniform", 2, 9, seed=17, dtype=torch.float64).requires_grad_()

    def f(q, p):
        d = pointconv.knn(q, p, 4).dists
        return d

    torch.autograd.gradcheck(f, (q, p))
    torch.autograd.gradgradcheck(f, (q, p))
    # A padded slot (k > P) is inf and carries no gradient.
    d = pointconv.knn(q, p[:, :2], 3).dists
    assert bool(torch.isinf(d[..., 2]).all())
    d[..., :2].sum().backward()
    assert torch.isfinite(q.grad).all()


def test_backend_reference_forced_gives_the_same_result():
    q = make_cloud("duplicated", 2, 100, seed=18)
    p = make_cloud("duplicated", 2, 120, seed=19)
    with pointconv.use_backend("reference"):
        a = pointconv.knn(q, p, 9)
    assert_same(pointconv.knn(q, p, 9), a)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), Q=st.integers(0, 40), P=st.integers(0, 40), D=st.integers(1, 4),
    k=st.integers(1, 50), grid=st.booleans(), seed=st.integers(0, 2**16), data=st.data(),
)
def test_knn_property(B, Q, P, D, k, grid, seed, data):
    g = torch.Generator().manual_seed(seed)
    if grid:  # integer coordinates: many exact ties and duplicates
        q = torch.randint(0, 3, (B, Q, D), generator=g).float()
        p = torch.randint(0, 3, (B, P, D), generator=g).float()
    else:
        q, p = torch.rand(B, Q, D, generator=g), torch.rand(B, P, D, generator=g)
    ql = torch.tensor(data.draw(st.lists(st.integers(0, Q), min_size=B, max_size=B)))
    pl = torch.tensor(data.draw(st.lists(st.integers(0, P), min_size=B, max_size=B)))
    res = pointconv.knn(q, p, k, query_lengths=ql, points_lengths=pl)
    ref = knn_reference(q, p, k, query_lengths=ql, points_lengths=pl)
    assert_same(res, ref)
    # invariants: ascending, -1 exactly where inf, indices inside the cloud
    assert bool((res.dists[..., 1:] >= res.dists[..., :-1]).all())
    assert torch.equal(res.idx == -1, torch.isinf(res.dists))
    assert bool((res.idx < pl[:, None, None]).all())
    n_found = (res.idx >= 0).sum(-1)
    expect = torch.minimum(pl, torch.tensor(k))[:, None].expand(B, Q) * (torch.arange(Q)[None] < ql[:, None])
    assert torch.equal(n_found, expect)


def _clustered_with_outliers(n, seed):
    x = make_cloud("clustered", 1, n, seed=seed)
    x[:, ::97] = x[:, ::97] * 4 - 20  # a few far points: the sampled distance bound misses them
    return x


@pytest.mark.parametrize("exclude_self", [False, True])
def test_large_self_search_matches_brute_force(exclude_self):
    from pointconv.neighbors._brute_force import exact_rows_search

    p = _clustered_with_outliers(6000, seed=22)  # self-search: queries in the tree's leaf order
    res = pointconv.knn(p, p, 9, exclude_self=exclude_self)
    d, i = exact_rows_search(p[0], p[0], 9, None, exclude_self)
    assert torch.equal(res.idx[0], i) and torch.equal(res.dists[0], d)


@pytest.mark.parametrize("radius", [None, 0.3])
def test_many_queries_with_a_sampled_bound_match_brute_force(radius):
    from pointconv.neighbors._brute_force import exact_rows_search
    from pointconv.neighbors._distance import radius_squared

    q = _clustered_with_outliers(25000, seed=23)  # >= 20000 queries: bounded first pass
    p = _clustered_with_outliers(3000, seed=24)
    if radius is None:
        res = pointconv.knn(q, p, 12)
    else:
        res = pointconv.ball_query(q, p, radius, 12)
    r2 = None if radius is None else radius_squared(radius, torch.float32)
    d, i = exact_rows_search(q[0], p[0], 12, r2, False)
    assert torch.equal(res.idx[0], i) and torch.equal(res.dists[0], d)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.autograd.functional.jvp's own torch.jit use)
@pytest.mark.parametrize("op", ["knn", "ball_query"])
def test_forward_mode_tangent_of_the_distances(op):
    # the search runs on detached values: without a recomputation the distances came back from
    # torch.autograd.forward_ad with no tangent at all, silently
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    q, p = torch.rand(1, 6, 3, generator=g, dtype=torch.float64), torch.rand(1, 9, 3, generator=g, dtype=torch.float64)
    tq, tp = torch.randn(q.shape, generator=g, dtype=torch.float64), torch.randn(p.shape, generator=g, dtype=torch.float64)

    def dists(q, p):
        out = pointconv.knn(q, p, 4) if op == "knn" else pointconv.ball_query(q, p, 0.6, 4)
        return torch.where(out.idx >= 0, out.dists, 0.0)

    expect = torch.autograd.functional.jvp(dists, (q, p), (tq, tp))[1]
    with fwAD.dual_level():
        got = fwAD.unpack_dual(dists(fwAD.make_dual(q, tq), fwAD.make_dual(p, tp))).tangent
    assert got is not None and expect.abs().max() > 0
    torch.testing.assert_close(got, expect)
