import pytest
import torch

import pointconv


def _cloud(B=2, N=60, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(B, N, 3, generator=g, dtype=torch.float64) * 2 - 0.5
    feats = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    return pts, feats


@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
def test_voxelize_matches_a_dictionary(reduce):
    pts, feats = _cloud()
    lengths = torch.tensor([60, 41])
    x, pv = pointconv.voxelize(pts, feats, 0.5, lengths=lengths, reduce=reduce)
    origin = x.voxel_origin
    groups = {}
    for b in range(2):
        for i in range(int(lengths[b])):
            key = (b, *torch.floor((pts[b, i] - origin) / 0.5).long().tolist())
            groups.setdefault(key, []).append(feats[b, i])
    keys = sorted(groups)
    assert [tuple(r) for r in x.indices.tolist()] == keys
    for row, key in enumerate(keys):
        v = torch.stack(groups[key])
        expect = {"mean": v.mean(0), "sum": v.sum(0), "max": v.max(0).values}[reduce]
        torch.testing.assert_close(x.features[row], expect)
    assert bool((pv[1, 41:] == -1).all())
    assert keys[int(pv[0, 5])] == (0, *torch.floor((pts[0, 5] - origin) / 0.5).long().tolist())


def test_default_origin_never_overshoots_the_points():
    # floor(lo / voxel_size) * voxel_size can round above lo (0.9 / 0.1 in float32; 300 of the
    # first 4,000 multiples of 0.1 here): the default origin must keep every coordinate >= 0
    for dtype in (torch.float32, torch.float64):
        lo = torch.arange(1, 4001, dtype=dtype) * 0.1
        for chunk in lo.split(500):
            pts = torch.stack([chunk, torch.full_like(chunk, 0.5), chunk + 1], -1)[:, None, :]  # one cloud each
            pts = torch.cat([pts, pts + torch.tensor([1.0, 1.0, 2.0], dtype=dtype)], 1)
            x, pv = pointconv.voxelize(pts, torch.ones(*pts.shape[:2], 1, dtype=dtype), 0.1)
            assert bool((x.indices[:, 1:] >= 0).all()) and bool((pv >= 0).all())
            assert bool((x.voxel_origin <= pts.amin((0, 1))).all())
    one = torch.tensor([[[0.9999999999999999, 0.0, 0.0]]], dtype=torch.float64)
    x, _ = pointconv.voxelize(one, torch.ones(1, 1, 1, dtype=torch.float64), 1 / 3)
    assert x.indices.tolist() == [[0, 0, 0, 0]]


def test_devoxelize_nearest_round_trip():
    pts, feats = _cloud(seed=1)
    x, pv = pointconv.voxelize(pts, feats, 0.3)
    back = pointconv.devoxelize(x, pts, mode="nearest")
    torch.testing.assert_close(back, x.features[pv])


def test_trilinear_reproduces_linear_functions_and_renormalizes():
    # every voxel of a 6^3 block active, features = a linear function of the voxel center
    g = torch.arange(6, dtype=torch.float64)
    centers = (torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(1, -1, 3) + 0.5) * 0.25
    lin = lambda p: (p * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum(-1, keepdim=True) + 3  # noqa: E731
    x, _ = pointconv.voxelize(centers, lin(centers), 0.25, origin=[0.0, 0.0, 0.0])
    q = 0.125 + torch.rand(1, 30, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.25
    torch.testing.assert_close(pointconv.devoxelize(x, q), lin(q))
    # a query whose 8 corners include inactive voxels: weights renormalize over the active ones
    keep = x.indices[:, 1] < 3
    y = pointconv.sparse.SparseConvTensor(x.features[keep], x.indices[keep], x.spatial_shape, 1)
    y.voxel_origin, y.voxel_size = x.voxel_origin, x.voxel_size
    p = torch.tensor([[[0.76, 0.5, 0.5]]], dtype=torch.float64)  # between x-layers 2 (active) and 3 (not)
    out = pointconv.devoxelize(y, p)
    ref = pointconv.devoxelize(y, torch.tensor([[[0.625, 0.5, 0.5]]], dtype=torch.float64))
    torch.testing.assert_close(out, ref)  # only layer 2 contributes, at its own x


def test_an_inactive_corner_reads_zero_whatever_the_first_voxel_holds():
    """Inactive voxels read as zeros, not as 0 * (the first voxel's features): an inf there (a max
    over no finite value, a user's feature) made NaN of every point next to an inactive voxel."""
    pts = torch.tensor([[[0.1, 0.1, 0.1], [5.1, 5.1, 5.1], [5.9, 5.2, 5.3]]])
    x, _ = pointconv.voxelize(pts, torch.tensor([[[float("inf")], [1.0], [3.0]]]), 1.0, reduce="max")
    assert x.indices[0].tolist() == [0, 0, 0, 0] and x.features[0].item() == float("inf")
    q = torch.tensor([[[5.5, 5.5, 5.5], [2.5, 2.5, 2.5], [5.2, 5.9, 5.7]]])  # (5,5,5), inactive, near (5,5,5)
    assert pointconv.devoxelize(x, q, mode="nearest").tolist() == [[[3.0], [0.0], [3.0]]]
    assert pointconv.devoxelize(x, q).tolist() == [[[3.0], [0.0], [3.0]]]  # only (5,5,5) is active nearby


def test_devoxelize_gradients_wrt_features_and_points():
    pts, feats = _cloud(B=1, N=20, C=2, seed=3)
    x, _ = pointconv.voxelize(pts, feats, 0.4)
    q = pts[:, :6].clone() + 0.01
    f = x.features.detach().clone().requires_grad_()
    qq = q.clone().requires_grad_()

    def fn(f, qq):
        y = x.replace_feature(f)
        return pointconv.devoxelize(y, qq)

    torch.autograd.gradcheck(fn, (f, qq))
    torch.autograd.gradgradcheck(fn, (f, qq))
    fv = feats.clone().requires_grad_()
    torch.autograd.gradgradcheck(lambda fv: pointconv.voxelize(pts, fv, 0.4)[0].features ** 2, (fv,))


def test_bad_input():
    pts, feats = _cloud()
    with pytest.raises(ValueError, match="voxel_size must be"):
        pointconv.voxelize(pts, feats, 0)
    with pytest.raises(ValueError, match="reduce must be"):
        pointconv.voxelize(pts, feats, 0.5, reduce="median")
    with pytest.raises(ValueError, match="origin must not exceed"):
        pointconv.voxelize(pts, feats, 0.5, origin=[5.0, 5.0, 5.0])
    x, _ = pointconv.voxelize(pts, feats, 0.5)
    with pytest.raises(ValueError, match="mode must be"):
        pointconv.devoxelize(x, pts, mode="cubic")
    with pytest.raises(ValueError, match="batch size"):
        pointconv.devoxelize(x, pts[:1])


@pytest.mark.parametrize("feature_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("point_dtype", [torch.float32, torch.float64])
def test_devoxelize_returns_the_features_dtype(feature_dtype, point_dtype):
    # trilinear returned the promoted dtype (float32 for fp16 features) and nearest the features'
    g = torch.Generator().manual_seed(4)
    pts = torch.rand(2, 50, 3, generator=g, dtype=torch.float64).to(point_dtype)
    x, _ = pointconv.voxelize(pts, torch.randn(2, 50, 3, generator=g).to(feature_dtype), 0.2)
    wide = x.replace_feature(x.features.to(torch.promote_types(feature_dtype, point_dtype)))
    for mode in ("trilinear", "nearest"):
        got = pointconv.devoxelize(x, pts, mode=mode)
        assert got.dtype == feature_dtype
        # the same weights and sums as with the features widened, rounded once at the end
        assert torch.equal(got, pointconv.devoxelize(wide, pts, mode=mode).to(feature_dtype))
    assert pointconv.devoxelize(x, pts[:, :0]).dtype == feature_dtype


@pytest.mark.parametrize("dtype, offset, step, voxel", [(torch.float32, 1e6, 1 / 16, 0.01),
                                                        (torch.float64, 1e12, 2.0**-13, 1e-5)])
def test_default_origin_far_from_zero(dtype, offset, step, voxel):
    # floor(lo / voxel) * voxel rounded above lo, and one voxel lower rounded back to it: the
    # points' voxel coordinates were -1 ("origin must not exceed ...", an origin never passed)
    for k in range(64):
        base = offset + k * step  # exact in the dtype: the ulp there is the step
        pts = torch.tensor([[[base, 0.0, 0.0], [base + 200 * voxel, 0.0, 0.0]]], dtype=dtype)
        x, point_voxel = pointconv.voxelize(pts, torch.ones(1, 2, 1, dtype=dtype), voxel)
        assert bool((x.voxel_origin <= pts[0].amin(0)).all())
        u = torch.floor((pts[0] - x.voxel_origin) / voxel)  # each point in its voxel, as computed in the dtype
        assert torch.equal(x.indices[point_voxel[0], 1:].to(dtype), u)


def test_voxel_size_must_be_a_normal_number_of_the_points_dtype():
    pts = torch.rand(1, 5, 3)
    for voxel in (1e39, 1e-39):
        with pytest.raises(ValueError, match="voxel_size = .* is not a normal torch.float32 number"):
            pointconv.voxelize(pts, torch.ones(1, 5, 1), voxel)
    x, _ = pointconv.voxelize(pts.double(), torch.ones(1, 5, 1, dtype=torch.float64), 1e39)
    assert x.indices.tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="voxel_size"):
        pointconv.devoxelize(x, pts, 1e39)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_voxelize_sums_in_float64(dtype):
    # the mean of many features far from zero, all in one voxel: summed in the features' dtype,
    # float32 drifted and float16 overflowed past 65504 to inf
    g = torch.Generator().manual_seed(1)
    n = 200_000 if dtype == torch.float32 else 1000
    feats = (1000 + torch.rand(1, n, 2, generator=g)).to(dtype)
    points = torch.rand(1, n, 3, generator=g) * 0.5
    tensor, _ = pointconv.voxelize(points, feats, 1.0)
    assert tensor.features.shape == (1, 2) and tensor.features.dtype == dtype
    ref = feats[0].double().mean(0).to(dtype)
    torch.testing.assert_close(tensor.features[0], ref, rtol=0, atol=1e-4 if dtype == torch.float32 else 0.5)
    summed, _ = pointconv.voxelize(points, feats.float(), 1.0, reduce="sum")
    torch.testing.assert_close(summed.features[0].double(), feats[0].double().sum(0), rtol=1e-7, atol=0)


def test_voxelize_max_gradient_at_minus_infinity():
    # a voxel whose max is -inf: its gradient is 1, split evenly between exact ties (torch's backward
    # had counted the voxels' -inf starting value as one more tie: 1/2 for a lone -inf)
    inf = float("inf")
    pts = torch.tensor([[[0.5, 0.5, 0.5], [1.5, 1.5, 1.5], [1.6, 1.6, 1.6], [2.5, 2.5, 2.5]]])
    feats = torch.tensor([[[2.0], [-inf], [-inf], [-inf]]], requires_grad=True)
    x, _ = pointconv.voxelize(pts, feats, 1.0, reduce="max")
    grad, = torch.autograd.grad(x.features.sum(), feats)
    assert grad[0, :, 0].tolist() == [1.0, 0.5, 0.5, 1.0]
