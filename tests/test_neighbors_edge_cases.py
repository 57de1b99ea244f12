"""Neighbor search at the edges of floating point and of sizes: underflowed distances, clouds of
many identical points, coordinates whose squares overflow, absurd output sizes, sparse cloud ids."""
import pytest
import torch

import pointconv
import pointconv.neighbors._cpu as cpu


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
    """3000 copies of one point: every query ties with all of them. The exact fallback takes each
    group of identical points once (at most k + 1 of its lowest indices) instead of 3000 x 3000
    candidates; the answers are the reference's."""
    made = []
    real = cpu._DuplicateGroups

    def spy(tree, keep):
        made.append(keep)
        return real(tree, keep)

    monkeypatch.setattr(cpu, "_DuplicateGroups", spy)
    p = torch.zeros(1, 3000, 3)
    got = pointconv.knn(p, p, 16)
    assert torch.equal(got.idx[0], torch.arange(16).expand(3000, 16)) and not got.dists.any()
    assert made == [16]
    # exclude_self: the 16 lowest other indices
    j = torch.arange(16)[None]
    want = torch.where(j >= torch.arange(3000)[:, None], j + 1, j)
    assert torch.equal(pointconv.knn(p, p, 16, exclude_self=True).idx[0], want)
    assert made == [16, 17]
    # a cluster of copies inside a random cloud, with ball queries too
    g = torch.Generator().manual_seed(1)
    mixed = torch.rand(1, 3000, 3, generator=g)
    mixed[0, 400:2600] = mixed[0, 7]
    for exclude_self in (False, True):
        assert_same(pointconv.knn(mixed, mixed, 8, exclude_self=exclude_self),
                    reference(pointconv.knn, mixed, mixed, 8, exclude_self=exclude_self))
    assert_same(pointconv.ball_query(mixed, mixed, 0.05, 8), reference(pointconv.ball_query, mixed, mixed, 0.05, 8))
    assert len(made) >= 4


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
