import pytest
import torch

import pointconv
from pointconv.neighbors import grid_subsample_reference
from clouds import KINDS, make_cloud


def naive_fps(x, n, start=0):
    """Textbook farthest point sampling of one cloud ``(N, D)``; never repeats an index."""
    chosen = [start]
    while len(chosen) < min(n, len(x)):
        best, best_d = None, -1.0
        for j in range(len(x)):
            if j in chosen:
                continue
            dj = min(float(((x[j] - x[c]) ** 2).sum()) for c in chosen)
            if dj > best_d:
                best, best_d = j, dj
        chosen.append(best)
    return chosen + [-1] * (n - len(chosen))


@pytest.mark.parametrize("kind", KINDS)
def test_fps_matches_naive(kind, device):
    x = make_cloud(kind, 2, 40, seed=1, dtype=torch.float64, device=device)
    lengths = torch.tensor([40, 25], device=device)
    out = pointconv.farthest_point_sample(x, 30, lengths=lengths)
    assert out.dtype == torch.int64 and out.shape == (2, 30)
    assert out[0].tolist() == naive_fps(x[0].cpu(), 30)
    assert out[1].tolist() == naive_fps(x[1, :25].cpu(), 30)


def test_fps_distinct_and_padded(device):
    x = torch.zeros(1, 10, 3, device=device)  # all duplicates
    out = pointconv.farthest_point_sample(x, 12)
    assert sorted(out[0, :10].tolist()) == list(range(10))
    assert out[0, 10:].tolist() == [-1, -1]
    out = pointconv.farthest_point_sample(x, 3, lengths=torch.tensor([0], device=device))
    assert out.tolist() == [[-1, -1, -1]]


def test_fps_random_start_is_seeded():
    x = make_cloud("uniform", 3, 50, seed=2)
    torch.manual_seed(0)
    a = pointconv.farthest_point_sample(x, 8, random_start=True)
    torch.manual_seed(0)
    b = pointconv.farthest_point_sample(x, 8, random_start=True)
    assert torch.equal(a, b)
    starts = set()
    for s in range(10):
        torch.manual_seed(s)
        starts.add(int(pointconv.farthest_point_sample(x, 1, random_start=True)[0, 0]))
    assert len(starts) > 1
    for b in range(3):  # later samples follow from the start exactly
        assert a[b].tolist() == naive_fps(x[b], 8, start=int(a[b, 0]))


@pytest.mark.parametrize("kind", ["uniform", "clustered", "lattice"])
def test_grid_subsample_matches_reference(kind, device):
    x = make_cloud(kind, 2, 120, seed=3, dtype=torch.float64, device=device)
    lengths = torch.tensor([120, 41], device=device)
    res = pointconv.grid_subsample(x, 0.25, lengths=lengths)
    ref = grid_subsample_reference(x.cpu(), 0.25, lengths.cpu())
    assert torch.equal(res.lengths.cpu(), ref.lengths)
    torch.testing.assert_close(res.points.cpu(), ref.points, rtol=1e-12, atol=1e-12)


def test_grid_subsample_gradient_and_empty():
    x = make_cloud("uniform", 2, 15, seed=4, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda x: pointconv.grid_subsample(x, 0.5).points, (x,))
    res = pointconv.grid_subsample(torch.zeros(2, 0, 3), 0.1)
    assert res.points.shape == (2, 0, 3) and res.lengths.tolist() == [0, 0]


def test_grid_subsample_is_bitwise_repeatable_on_cpu():
    # about 25 points per voxel: their sums must not depend on how threads split them
    x = torch.rand(1, 200_000, 3, generator=torch.Generator().manual_seed(5))
    runs = [pointconv.grid_subsample(x, 0.05).points for _ in range(6)]
    assert all(torch.equal(runs[0], other) for other in runs[1:])


def test_grid_subsample_huge_key_range_uses_the_general_unique():
    # Voxel coordinates spanning ~1e15 per axis: no single int64 key fits (the other code path).
    x = torch.tensor([[[1e6, -1e6, 3.0], [-1e6, 1e6, 3.0], [1e6, -1e6, 3.0], [0.5, 0.5, 0.5]]], dtype=torch.float64)
    res = pointconv.grid_subsample(x, 1e-9)
    ref = grid_subsample_reference(x, 1e-9)
    assert res.lengths.tolist() == ref.lengths.tolist() == [3]
    torch.testing.assert_close(res.points, ref.points)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1, 3, 5])
def test_fps_cpu_path_equals_the_torch_reference(kind, dtype, D):
    """The CPU path (NumPy) runs the reference's operations in order: the same indices."""
    from pointconv.neighbors.sampling import _fps_numpy, _fps_torch

    x = make_cloud(kind, 3, 200, D=D, seed=7, dtype=dtype)
    lengths = torch.tensor([200, 57, 0])
    start = torch.tensor([0, 56, 0])
    for n in (1, 64, 250):  # 250 > N: padded
        ours = _fps_numpy(x, n, lengths, start)
        assert torch.equal(ours, _fps_torch(x, n, lengths, start))
    assert torch.equal(pointconv.farthest_point_sample(x, 64, lengths=lengths), _fps_torch(x, 64, lengths, torch.zeros(3, dtype=torch.long)))


def test_grid_voxel_size_beyond_float32_is_not_rounded_to_0_or_inf():
    # a float32 division rounded voxel_size to float32 first: 1e-50 became 0 (every point NaN or
    # inf, one voxel), 1e39 became inf (-1 / inf = -0: voxel 0 instead of -1)
    pts = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match="voxel_size 1e-50 is too small"):
            pointconv.grid_subsample(pts.to(dtype), 1e-50)
        two = torch.tensor([[[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=dtype)
        for fn in (pointconv.grid_subsample, grid_subsample_reference):
            out = fn(two, 1e39)
            assert out.lengths.tolist() == [2] and torch.equal(out.points, two)


def test_grid_subsample_means_of_many_points_far_from_the_origin():
    # 200K float32 points in one voxel near 1000: summed in float32 one by one, their mean drifted
    # by 2.2 (outside the voxel); summed in float64 it is within float32 rounding of the true mean
    g = torch.Generator().manual_seed(0)
    x = 1000 + 0.9 * torch.rand(1, 200_000, 3, generator=g)
    out = pointconv.grid_subsample(x, 1.0)
    assert out.lengths.tolist() == [1]
    torch.testing.assert_close(out.points[0, 0].double(), x[0].double().mean(0), rtol=0, atol=1e-4)


def test_grid_subsample_takes_any_finite_coordinates():
    # no squared distances here: coordinates past float32's distance range (~5e18 in 3-D) are fine
    x = torch.tensor([[[1.2e19, 0, 0], [1.6e19, 0, 0], [3.5e19, 0, 0]]])
    out = pointconv.grid_subsample(x, 1e19)
    assert out.lengths.tolist() == [2]
    torch.testing.assert_close(out.points[0], torch.tensor([[1.4e19, 0, 0], [3.5e19, 0, 0]]))
