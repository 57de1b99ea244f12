import pytest
import torch

import pointconv

P = torch.rand(2, 10, 3)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: pointconv.knn(P, P[0], 3), ValueError, r"points must have shape \(B, N, D\)"),
    (lambda: pointconv.knn(P[0], P, 3), ValueError, r"query must have shape \(B, N, D\)"),
    (lambda: pointconv.knn(P[:1], P, 3), ValueError, "query has batch size 1 but points has 2"),
    (lambda: pointconv.knn(P[..., :2], P, 3), ValueError, "query has D = 2 but points has D = 3"),
    (lambda: pointconv.knn(P.long(), P, 3), TypeError, "query must be float32 or float64"),
    (lambda: pointconv.knn(P, P.double(), 3), TypeError, "query has dtype torch.float32 but points"),
    (lambda: pointconv.knn(P, P, 0), ValueError, "k must be >= 1"),
    (lambda: pointconv.knn(P, P, 2.5), TypeError, "k must be an int"),
    (lambda: pointconv.knn(P, P, True), TypeError, "k must be an int"),
    (lambda: pointconv.knn([[0.0]], P, 3), TypeError, "query must be a torch.Tensor"),
    (lambda: pointconv.knn(P, P, 3, points_lengths=torch.tensor([11, 3])), ValueError,
     r"points_lengths must lie in \[0, 10\]"),
    (lambda: pointconv.knn(P, P, 3, query_lengths=torch.tensor([-1, 3])), ValueError,
     r"query_lengths must lie in \[0, 10\]"),
    (lambda: pointconv.knn(P, P, 3, query_lengths=torch.tensor([1, 3, 4])), ValueError,
     r"query_lengths must have shape \(2,\)"),
    (lambda: pointconv.knn(P, P, 3, query_lengths=torch.tensor([1.0, 3.0])), TypeError,
     "query_lengths must be an int32 or int64"),
    (lambda: pointconv.knn(P, P[:, :5], 3, exclude_self=True), ValueError, "same cloud"),
    (lambda: pointconv.knn(P.clone().index_fill_(1, torch.tensor([2]), float("nan")), P, 3),
     ValueError, "query contains NaN or Inf"),
    (lambda: pointconv.knn(P, P.clone().index_fill_(1, torch.tensor([2]), float("inf")), 3),
     ValueError, "points contains NaN or Inf"),
    (lambda: pointconv.ball_query(P, P, 0.0, 3), ValueError, "radius must be a finite number > 0"),
    (lambda: pointconv.ball_query(P, P, -1.0, 3), ValueError, "radius must be a finite number > 0"),
    (lambda: pointconv.ball_query(P, P, float("nan"), 3), ValueError, "radius must be a finite number > 0"),
    (lambda: pointconv.ball_query(P, P, "1", 3), TypeError, "radius must be a positive number"),
    (lambda: pointconv.ball_query(P, P, 0.1, 0), ValueError, "k must be >= 1"),
    (lambda: pointconv.farthest_point_sample(P, 0), ValueError, "n must be >= 1"),
    (lambda: pointconv.farthest_point_sample(P[0], 2), ValueError, r"points must have shape \(B, N, D\)"),
    (lambda: pointconv.farthest_point_sample(P, 2, lengths=torch.tensor([0, 12])), ValueError,
     r"lengths must lie in \[0, 10\]"),
    (lambda: pointconv.grid_subsample(P, 0.0), ValueError, "voxel_size must be a finite number > 0"),
    (lambda: pointconv.grid_subsample(P, [0.1]), TypeError, "voxel_size must be a positive number"),
    (lambda: pointconv.NeighborIndex(P[0]), ValueError, r"points must have shape \(B, N, D\)"),
    (lambda: pointconv.NeighborIndex(P, torch.tensor([3, 40])), ValueError, r"lengths must lie in"),
    (lambda: pointconv.NeighborIndex(P).knn(P[..., :2], 3), ValueError, "query has D = 2"),
    (lambda: pointconv.NeighborIndex(P).ball_query(P, -2.0, 3), ValueError, "radius must be"),
])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_zero_dimensional_coordinates():
    with pytest.raises(ValueError, match="at least one coordinate"):
        pointconv.knn(torch.zeros(1, 2, 0), torch.zeros(1, 2, 0), 1)


def test_mixed_devices():
    from pointconv import _checks
    with pytest.raises(ValueError, match="points is on meta but query is on cpu"):
        _checks.same_device(query=P, points=P.to("meta"))


@pytest.mark.parametrize("call, name", [
    (lambda m: pointconv.knn(P, m, 3), "points"),
    (lambda m: pointconv.knn(m, P, 3), "query"),
    (lambda m: pointconv.ball_query(P, P, torch.tensor(0.2, device="meta"), 3), "radius"),
    (lambda m: pointconv.knn(P, P, torch.tensor(3, device="meta")), "k"),
    (lambda m: pointconv.gather(m, torch.zeros(2, 4, 3, dtype=torch.long)), "values"),
    (lambda m: pointconv.farthest_point_sample(m, 2), "points"),
])
def test_meta_tensors_are_named(call, name):
    # a meta tensor holds no values: .item() on it raised a RuntimeError from inside torch
    with pytest.raises(ValueError, match=f"{name} is on the meta device"):
        call(P.to("meta"))


@pytest.mark.parametrize("k", [torch.tensor(True), torch.tensor([3]), torch.tensor(3.0)])
def test_integer_arguments_take_integer_0_dim_tensors_only(k):
    # torch.tensor(True) read as k = 1 (operator.index takes bool tensors and 1-element ones)
    with pytest.raises(TypeError, match="k must be an int or an integer 0-dim tensor"):
        pointconv.knn(P, P, k)
    assert pointconv.knn(P, P, torch.tensor(3)).idx.shape == (2, 10, 3)
