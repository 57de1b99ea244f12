"""Neighbor search at the edges of floating point and of sizes: underflowed distances, clouds of
many identical points, coordinates whose squares overflow, absurd output sizes, sparse cloud ids."""
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

import pointconv
import pointconv.neighbors._cpu as cpu
import pointconv.neighbors._trees as _trees
from pointconv.neighbors._brute_force import brute_force_search
from pointconv.neighbors._distance import radius_squared
from pointconv.neighbors._grouped_tree import GroupedTree, repeats_are_costly


def reference(fn, *args, **kwargs):
    with pointconv.use_backend("reference"):
        return fn(*args, **kwargs)


def assert_same(got, want):
    assert torch.equal(got.idx, want.idx)
    assert torch.equal(got.dists, want.dists)


@pytest.mark.parametrize("dtype,radius", [(torch.float32, 1e-30), (torch.float64, 1e-170)])
def test_a_radius_whose_square_underflows_still_holds_distance_zero(dtype, radius):
    """radius**2 rounds to 0: the closed ball d <= 0 holds the points at distance 0 (the kd-tree
    path asked cKDTree for distances below 0 and found none)."""
    p = torch.zeros(1, 4, 3, dtype=dtype)
    want = torch.arange(4).expand(1, 4, 4)
    assert torch.equal(pointconv.ball_query(p, p, radius, 4).idx, want)
    assert torch.equal(pointconv.NeighborIndex(p).ball_query(p, radius, 4).idx, want)
    packed = pointconv.ball_query_packed(p[0], p[0], radius, 4, query_batch=torch.zeros(4, dtype=torch.int64),
                                         points_batch=torch.zeros(4, dtype=torch.int64))
    assert torch.equal(packed.idx, want[0])
    assert torch.equal(reference(pointconv.ball_query, p, p, radius, 4).idx, want)


def test_distances_that_underflow_to_zero_are_ties_broken_by_index():
    """1e-60 and 9e-60 are both 0 in float32: the lower index comes first, as in the reference
    (cKDTree's float64 order put index 1 first and the relative error bound called it certain)."""
    points = torch.tensor([[[3e-30, 0, 0], [1e-30, 0, 0], [5.0, 0, 0], [-1e-30, 0, 0]]])
    query = torch.zeros(1, 1, 3)
    for k in (1, 2, 3):
        assert_same(pointconv.knn(query, points, k), reference(pointconv.knn, query, points, k))
    # many queries (the Z-ordered, pipelined path) on a cloud of such points
    g = torch.Generator().manual_seed(0)
    tiny = torch.randint(-3, 4, (1, 5000, 3), generator=g).float() * 1e-30
    assert_same(pointconv.knn(tiny, tiny, 5), reference(pointconv.knn, tiny, tiny, 5))


def test_thousands_of_identical_points_are_searched_as_groups(monkeypatch):
    """3000 copies of one point: cKDTree cannot split them (one leaf of 3000 points, scanned by
    every query near it) and every query ties with all of them. The tree is built over one point
    per group of identical points, each group standing for its k + 1 lowest indices; the answers
    are the reference's."""
    trees = []
    real = cpu.build_tree

    def spy(points):
        trees.append(real(points))
        return trees[-1]

    monkeypatch.setattr(cpu, "build_tree", spy)
    monkeypatch.setattr(_trees, "build_tree", spy)
    p = torch.zeros(1, 3000, 3)
    got = pointconv.knn(p, p, 16)
    assert torch.equal(got.idx[0], torch.arange(16).expand(3000, 16)) and not got.dists.any()
    assert isinstance(trees[-1], GroupedTree) and trees[-1].tree.n == 1
    # exclude_self: the 16 lowest other indices
    j = torch.arange(16)[None]
    want = torch.where(j >= torch.arange(3000)[:, None], j + 1, j)
    assert torch.equal(pointconv.knn(p, p, 16, exclude_self=True).idx[0], want)
    # a cluster of copies inside a random cloud, with ball queries too
    g = torch.Generator().manual_seed(1)
    mixed = torch.rand(1, 3000, 3, generator=g)
    mixed[0, 400:2600] = mixed[0, 7]
    for exclude_self in (False, True):
        assert_same(pointconv.knn(mixed, mixed, 8, exclude_self=exclude_self),
                    reference(pointconv.knn, mixed, mixed, 8, exclude_self=exclude_self))
    assert_same(pointconv.ball_query(mixed, mixed, 0.05, 8), reference(pointconv.ball_query, mixed, mixed, 0.05, 8))
    assert isinstance(trees[-1], GroupedTree) and trees[-1].tree.n == 800
    # other queries than the points, k beyond the cloud's distinct points, and float64
    q = torch.rand(1, 500, 3, generator=g)
    q[0, :100] = mixed[0, 7]
    for k in (3, 40):
        assert_same(pointconv.knn(q, mixed, k), reference(pointconv.knn, q, mixed, k))
    wide = mixed.double()
    assert_same(pointconv.knn(wide, wide, 5), reference(pointconv.knn, wide, wide, 5))
    few = torch.zeros(1, 40, 3)
    few[0, 20:] = 1
    assert_same(pointconv.knn(few, few, 30), reference(pointconv.knn, few, few, 30))
    # small clouds of a batch share one lifted tree: its groups are per cloud
    batch = torch.rand(6, 700, 3, generator=g)
    batch[:, 100:] = 0
    lengths = torch.tensor([700, 650, 700, 300, 700, 699])
    trees.clear()
    assert_same(pointconv.knn(batch, batch, 12, query_lengths=lengths, points_lengths=lengths, exclude_self=True),
                reference(pointconv.knn, batch, batch, 12, query_lengths=lengths, points_lengths=lengths, exclude_self=True))
    assert [type(t) for t in trees] == [GroupedTree] and trees[0].tree.n == 6 * 101


def _grouped(points):
    return GroupedTree(points.detach().double().numpy())


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 120), D=st.integers(1, 4), sites=st.integers(1, 8),
       k=st.integers(1, 40), exclude_self=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_grouped_trees_answer_as_the_reference(B, N, D, sites, k, exclude_self, seed, data):
    """Every kd-tree built over groups (small clouds too, lifted or not): clouds that repeat a few
    sites, with some distinct points among them, ragged lengths, self and other queries, kNN and
    ball query, against the dense reference."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.rand(sites, D, generator=g)
    p = pool[torch.randint(0, sites, (B, N), generator=g)]
    loose = torch.rand(B, N, generator=g) < data.draw(st.sampled_from([0.0, 0.2, 0.7]))
    p = torch.where(loose[..., None], torch.rand(B, N, D, generator=g), p)
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, N), min_size=B, max_size=B)))
    q = p if exclude_self else torch.rand(B, N // 2 + 1, D, generator=g)
    q_lengths = lengths if exclude_self else None
    made = []
    with mock.patch.object(_trees, "build_tree", lambda x: made.append(len(x)) or _grouped(x)):
        got = pointconv.knn(q, p, k, query_lengths=q_lengths, points_lengths=lengths, exclude_self=exclude_self)
        ball = pointconv.ball_query(q, p, 0.4, k, query_lengths=q_lengths, points_lengths=lengths,
                                    exclude_self=exclude_self)
    assert made or not int(lengths.max())
    assert_same(got, reference(pointconv.knn, q, p, k, query_lengths=q_lengths, points_lengths=lengths,
                               exclude_self=exclude_self))
    assert_same(ball, reference(pointconv.ball_query, q, p, 0.4, k, query_lengths=q_lengths,
                                points_lengths=lengths, exclude_self=exclude_self))


def test_grouped_tree_queries_as_a_tree_over_all_points():
    """``GroupedTree.query`` returns what cKDTree over every point would: the m nearest points in
    float64 order, inf / n past the bound, each group's points from its lowest index on."""
    g = torch.Generator().manual_seed(2)
    sites = torch.rand(30, 3, generator=g, dtype=torch.float64)
    data = sites[torch.randint(0, 30, (2000,), generator=g)].numpy()
    assert repeats_are_costly(data) and not repeats_are_costly(torch.rand(2000, 3, generator=g).double().numpy())
    tree = GroupedTree(data)
    plain = cKDTree(data)
    x = torch.rand(50, 3, generator=g, dtype=torch.float64).numpy()
    for m, bound in ((1, math.inf), (7, math.inf), (150, math.inf), (90, 0.2)):
        dd, ii = tree.query(x, k=m, distance_upper_bound=bound)
        want_d = plain.query(x, k=m, distance_upper_bound=bound)[0].reshape(50, m)
        assert np.array_equal(dd, want_d)
        found = ii < len(data)
        assert np.array_equal(found, np.isfinite(want_d))
        # each returned point is at its listed distance, and no point is listed twice in a row
        got_d = np.linalg.norm(data[np.where(found, ii, 0)] - x[:, None], axis=2)
        assert np.allclose(np.where(found, got_d, np.inf), dd, rtol=0, atol=1e-12)
        assert all(len(set(row[ok])) == ok.sum() for row, ok in zip(ii, found))
    # a group's points come lowest index first
    group = np.flatnonzero((data == data[0]).all(1))
    assert np.array_equal(tree.query(data[:1], k=len(group))[1][0], group)
    assert sorted(tree.indices.tolist()) == list(range(len(data)))
    # hashes that all collide: groups are runs of equal coordinates, copies of one point split into
    # several groups, and the answers are still every point's
    collided = GroupedTree(data, torch.zeros(len(data), dtype=torch.int64), torch.arange(len(data)))
    assert 30 < collided.tree.n < len(data)
    dd, ii = collided.query(x, k=40)
    assert np.array_equal(dd, plain.query(x, k=40)[0])
    assert np.allclose(np.linalg.norm(data[ii] - x[:, None], axis=2), dd, rtol=0, atol=1e-12)
    assert all(len(set(row)) == 40 for row in ii)


@pytest.mark.parametrize("lattice", [False, True])
def test_copies_at_the_kth_neighbor_are_certified_without_the_fallback(monkeypatch, lattice):
    """Sites repeated 60 times each: a query's k-th neighbor is one of many copies, and the copies
    left out tie with it. They have higher indices than the copies taken, so the tree's candidates
    prove the answer (every row used to go to the exact fallback). On a lattice, groups also tie
    with each other and the input dtype may rank another group last: those rows still fall back,
    and every answer is the reference's."""
    fallback_rows = []
    real = cpu._exact_fallback

    def spy(qb, *args, **kwargs):
        fallback_rows.append(len(qb))
        return real(qb, *args, **kwargs)

    monkeypatch.setattr(cpu, "_exact_fallback", spy)
    g = torch.Generator().manual_seed(3)
    sites = torch.randint(0, 5, (50, 3), generator=g).float() if lattice else torch.rand(50, 3, generator=g)
    p = sites[torch.randperm(3000, generator=g) % 50][None]  # 60 copies each (some sites coincide), shuffled
    assert repeats_are_costly(p[0].double().numpy())
    q = p[:, :1000] + (0.5 if lattice else 0.01)  # other queries too: near the copies, none on them
    for k, exclude_self in ((5, False), (16, True), (59, True), (70, False), (70, True)):
        fallback_rows.clear()
        assert_same(pointconv.knn(p, p, k, exclude_self=exclude_self),
                    reference(pointconv.knn, p, p, k, exclude_self=exclude_self))
        if not lattice and k < 60:  # k within the query's own group
            assert not fallback_rows
    assert_same(pointconv.knn(q, p, 70), reference(pointconv.knn, q, p, 70))
    assert_same(pointconv.ball_query(p, p, 1.5 if lattice else 0.1, 40, exclude_self=True),
                reference(pointconv.ball_query, p, p, 1.5 if lattice else 0.1, 40, exclude_self=True))


def test_a_group_just_past_the_sampled_bound_is_still_seen():
    """From 20,000 queries on, the tree is first queried within a sampled bound. Over groups of
    copies the m candidate slots can all be copies of one group inside it while the next group
    lies past it: such a row must be queried again, not certified. Here point 0 ties in float32
    with the 100 copies (indices 1-100) nearer in float64, and must come first."""
    p = torch.tensor([[6000.0, 1.0]] + [[6000.0, 0.0]] * 100)
    q = torch.tensor([0.0, 0.5]).expand(20000, 2).clone()  # these set the sampled bound
    q[::200] = 0.0  # 0.5% of the rows: 6000^2 and 6000.0000833^2 are one float32
    for search in (lambda: pointconv.knn(q[None], p[None], 1), lambda: pointconv.knn(q[None], p[None], 3),
                   lambda: pointconv.ball_query(q[None], p[None], 6001.0, 1),
                   lambda: pointconv.NeighborIndex(p[None]).knn(q[None], 1),
                   lambda: pointconv.knn(q.view(2, 10000, 2), torch.stack([p, p]), 1)):  # a lifted tree
        got = search()
        assert got.idx.flatten(0, 1)[0].tolist()[:1] == [0]
        assert_same(got, reference(lambda *a: search()))


def test_ties_at_the_kth_neighbor_on_a_lattice_match_the_reference():
    """Voxel centers of a sphere shell: integer coordinates, so the k-th neighbor ties with many
    points at the same distance and most queries go to the exact fallback (which asks the tree for
    more candidates until the last one lies beyond the tie)."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(6000, 3, generator=g)
    shell = torch.unique((v / v.norm(dim=1, keepdim=True) * 15).round(), dim=0)[None]
    for k in (6, 19, 27):
        for exclude_self in (False, True):
            assert_same(pointconv.knn(shell, shell, k, exclude_self=exclude_self),
                        reference(pointconv.knn, shell, shell, k, exclude_self=exclude_self))
    assert_same(pointconv.ball_query(shell, shell, 1.5, 12), reference(pointconv.ball_query, shell, shell, 1.5, 12))
    queries = shell[:, ::3] + 0.5  # halfway between lattice points: ties in every direction
    assert_same(pointconv.knn(queries, shell, 8), reference(pointconv.knn, queries, shell, 8))


def test_lattice_ties_widen_the_first_query(monkeypatch):
    """From 4096 queries on, a sample sizes the first query: on a lattice it asks for the tied
    candidates at once instead of sending most rows to the fallback; the answers stay exact."""
    widths = []
    first = cpu._first_candidates
    monkeypatch.setattr(cpu, "_first_candidates", lambda tree, q64, m, *a: widths.append((m, first(tree, q64, m, *a)))
                        or widths[-1][1])
    g = torch.Generator().manual_seed(4)
    v = torch.randn(40000, 3, generator=g)
    shell = torch.unique((v / v.norm(dim=1, keepdim=True) * 26).round(), dim=0)[None]
    assert shell.shape[1] > 4096
    x = shell[0]
    for k, exclude_self in ((16, False), (9, True)):  # the brute force (tested on its own) as the oracle
        res = pointconv.knn(shell, shell, k, exclude_self=exclude_self)
        d, i = brute_force_search(x, x, k, None, exclude_self)
        assert torch.equal(res.dists[0], d) and torch.equal(res.idx[0], i)
    res = pointconv.ball_query(shell, shell, 2.5, 20)
    d, i = brute_force_search(x, x, 20, radius_squared(2.5, torch.float32), False)
    assert torch.equal(res.dists[0], d) and torch.equal(res.idx[0], i)
    assert all(wide > m for m, wide in widths) and len(widths) == 3
    uniform = torch.rand(1, 5000, 3, generator=g)
    pointconv.knn(uniform, uniform, 16)
    assert widths[-1] == (17, 17)  # no ties: one more than needed, as before
    pointconv.ball_query(uniform, uniform, 0.01, 16)  # most rows have fewer than 16 in the ball
    assert widths[-1] == (17, 17)


def test_coordinates_whose_squared_distances_overflow_are_refused():
    """float32 points 3e19 apart have squared distance inf, which would read as no neighbor."""
    far = torch.tensor([[[0.0, 0, 0], [3e19, 0, 0]]])
    with pytest.raises(ValueError, match="points has coordinates beyond .* overflow torch.float32"):
        pointconv.knn(far, far, 2)
    with pytest.raises(ValueError, match="query has coordinates beyond"):
        pointconv.knn(far, torch.zeros(1, 2, 3), 2)
    with pytest.raises(ValueError, match="coordinates beyond"):
        pointconv.knn_packed(far[0], far[0], 2, query_batch=torch.zeros(2, dtype=torch.int64),
                             points_batch=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="coordinates beyond"):
        pointconv.farthest_point_sample(far, 2)
    with pytest.raises(ValueError, match=r"overflow torch.float64 \(rescale the coordinates\)"):
        pointconv.knn(torch.full((1, 2, 3), 1e160, dtype=torch.float64), torch.zeros(1, 2, 3, dtype=torch.float64), 1)
    # in float64 the same points are fine
    far64 = torch.tensor([[[0.0, 0, 0], [3e19, 0, 0]]], dtype=torch.float64)
    res = pointconv.knn(far64, far64, 2)
    assert res.idx.tolist() == [[[0, 1], [1, 0]]] and res.dists[0, 0, 1].item() == 3e19 * 3e19


def test_nan_padding_beyond_lengths_is_refused_too():
    """The finiteness check covers the whole tensor, padding included (as the README says): one
    check with no per-cloud pass, and NaN padding is usually a bug upstream."""
    x = torch.rand(2, 6, 3)
    x[1, 4:] = float("nan")
    lengths = torch.tensor([6, 4])
    with pytest.raises(ValueError, match="points contains NaN or Inf"):
        pointconv.knn(x, x, 2, query_lengths=lengths, points_lengths=lengths)
    res = pointconv.knn(torch.nan_to_num(x), torch.nan_to_num(x), 2, query_lengths=lengths, points_lengths=lengths)
    assert bool((res.idx[1, :4] < 4).all()) and bool((res.idx[1, 4:] == -1).all())


def test_absurd_output_sizes_and_non_bool_flags():
    p = torch.rand(1, 4, 3)
    with pytest.raises(ValueError, match="k asks for an output of shape"):
        pointconv.knn(p, p, 2**40)
    with pytest.raises(ValueError, match="k asks for an output of shape"):
        pointconv.ball_query(p, p, 0.5, 2**40)
    with pytest.raises(ValueError, match="k asks for an output"):
        pointconv.knn_packed(p[0], p[0], 2**40, query_batch=torch.zeros(4, dtype=torch.int64),
                             points_batch=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="n asks for an output of shape"):
        pointconv.farthest_point_sample(p, 2**40)
    with pytest.raises(TypeError, match="exclude_self must be a bool, got str"):
        pointconv.knn(p, p, 2, exclude_self="no")
    with pytest.raises(TypeError, match="exclude_self must be a bool"):
        pointconv.NeighborIndex(p).knn(p, 2, exclude_self=1)
    with pytest.raises(TypeError, match="random_start must be a bool"):
        pointconv.farthest_point_sample(p, 2, random_start="yes")


def test_grid_subsample_refuses_voxel_keys_beyond_int64():
    with pytest.raises(ValueError, match="voxel_size 1e-30 is too small"):
        pointconv.grid_subsample(torch.rand(1, 20, 3), 1e-30)
    with pytest.raises(ValueError, match="too small"):
        pointconv.grid_subsample(torch.tensor([[[1e30, 0, 0], [-1e30, 0, 0]]], dtype=torch.float64), 1.0)
    # large but representable keys keep their order and stay apart
    big = torch.tensor([[[9e17, 0, 0], [-9e17, 0, 0], [0.0, 0, 0]]], dtype=torch.float64)
    out = pointconv.grid_subsample(big, 1.0)
    assert out.lengths.tolist() == [3] and out.points[0, :, 0].tolist() == [-9e17, 0.0, 9e17]


def test_packed_cloud_ids_may_have_huge_gaps():
    """Sorted ids such as 0 and 10^12 name two clouds, not 10^12 + 1 of them (8 TB of padding)."""
    g = torch.Generator().manual_seed(2)
    q, p = torch.rand(7, 3, generator=g), torch.rand(9, 3, generator=g)
    qb, pb = torch.tensor([0, 0, 0, 5, 5, 12, 12]), torch.tensor([0, 0, 5, 5, 5, 12, 12, 12, 12])
    for scale in (10**11, 10**17):
        dense = pointconv.knn_packed(q, p, 3, query_batch=qb, points_batch=pb)
        sparse = pointconv.knn_packed(q, p, 3, query_batch=qb * scale, points_batch=pb * scale)
        assert_same(sparse, dense)
        ball = pointconv.ball_query_packed(q, p, 0.6, 3, query_batch=qb * scale, points_batch=pb * scale)
        assert_same(ball, pointconv.ball_query_packed(q, p, 0.6, 3, query_batch=qb, points_batch=pb))
    # ids only one side has: the queries of cloud 7 see no points
    got = pointconv.knn_packed(q, p, 2, query_batch=torch.tensor([0, 0, 0, 7, 7, 10**12, 10**12]),
                               points_batch=pb * 10**11)
    assert (got.idx[3:5] == -1).all() and (got.idx[:3] >= 0).all()


@pytest.mark.parametrize("B,P,length,k", [(1, 6, 3, 4), (1, 50, 20, 20), (1, 50, 20, 5), (2, 40, 12, 13)])
def test_exclude_self_for_queries_beyond_the_points_length(B, P, length, k):
    # a query at or past points_lengths has no self among the points: it keeps every neighbor (the
    # kd-tree path dropped its last candidate, and with every point a candidate never rechecked)
    g = torch.Generator().manual_seed(P + k)
    pts = torch.rand(B, P, 3, generator=g, dtype=torch.float64)
    lengths = torch.full((B,), length)
    for fn, args in ((pointconv.knn, (pts, pts, k)), (pointconv.ball_query, (pts, pts, 0.6, k))):
        got = fn(*args, points_lengths=lengths, exclude_self=True)
        assert_same(got, reference(fn, *args, points_lengths=lengths, exclude_self=True))
    knn_idx = pointconv.knn(pts, pts, k, points_lengths=lengths, exclude_self=True).idx
    assert ((knn_idx[:, length:] >= 0).sum(-1) == min(k, length)).all()  # every point, no self to drop
    index = pointconv.NeighborIndex(pts, lengths)
    assert_same(index.knn(pts, k, exclude_self=True),
                reference(pointconv.knn, pts, pts, k, points_lengths=lengths, exclude_self=True))
