"""Bad and empty inputs of conv (aggregate, adjacency, pointwise_conv, voxelize, devoxelize), nn
(KNNConv, RadiusConv, EdgeConv, PointwiseConv3d, PointwiseCNN) and gaussian: a clear ValueError /
TypeError naming the argument, or the right (empty, zero, padded) result, differentiable."""
import copy

import pytest
import torch

import pointconv
from pointconv.conv import pointwise_neighbors

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------------- aggregate

def test_aggregate_padded_slot_weight_adds_nothing():
    """A NaN / Inf weight where idx = -1 neither poisons the output nor the gradients."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[[0, -1, 2], [-1, -1, -1]], [[4, 1, -1], [3, -1, 3]]])
    w = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
    bad = w.masked_fill(idx < 0, NAN)
    bad[1, 0, 2] = INF
    clean = w.masked_fill(idx < 0, 0.0)
    bad.requires_grad_()
    clean.requires_grad_()
    out = pointconv.aggregate(values, idx, "weighted", bad)
    ref = pointconv.aggregate(values, idx, "weighted", clean)
    torch.testing.assert_close(out, ref)
    assert bool((out[0, 1] == 0).all())
    torch.testing.assert_close(out[0, 0], w[0, 0, 0] * values[0, 0] + w[0, 0, 2] * values[0, 2])
    gv, gw = torch.autograd.grad(out.square().sum(), (values, bad))
    rv, rw = torch.autograd.grad(ref.square().sum(), (values, clean))
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gw, rw)
    assert bool((gw[idx < 0] == 0).all())


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "weighted"])
@pytest.mark.parametrize("P,k", [(0, 2), (4, 0), (0, 0)])
def test_aggregate_empty(reduce, P, k):
    values = torch.randn(2, P, 3, requires_grad=True)
    idx = torch.full((2, 5, k), -1, dtype=torch.long) if P == 0 else torch.zeros(2, 5, k, dtype=torch.long)
    weights = torch.randn(2, 5, k, requires_grad=True) if reduce == "weighted" else None
    out = pointconv.aggregate(values, idx, reduce, weights)
    assert out.shape == (2, 5, 3) and bool((out == 0).all())
    out.sum().backward()
    assert values.grad.shape == values.shape and bool((values.grad == 0).all())


def test_aggregate_no_queries():
    values = torch.randn(2, 4, 3, requires_grad=True)
    out = pointconv.aggregate(values, torch.zeros(2, 0, 3, dtype=torch.long), "max")
    assert out.shape == (2, 0, 3)


# ----------------------------------------------------------------------------------------- adjacency

def test_adjacency_rejects_a_list():
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        pointconv.adjacency([[0, 1]], 2)


def test_adjacency_num_points_too_large():
    with pytest.raises(ValueError, match="num_points"):
        pointconv.adjacency(torch.zeros(1, 2, 1, dtype=torch.long), 2**62)


def test_adjacency_row_whose_weights_cancel_is_zero():
    idx = torch.tensor([[0, 1], [1, -1], [-1, -1]])
    w = torch.tensor([[1.0, -1.0], [2.0, NAN], [NAN, NAN]], requires_grad=True)
    adj = pointconv.adjacency(idx, 2, weights=w)
    torch.testing.assert_close(adj.to_dense(), torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    (adj.to_dense() * torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])).sum().backward()
    assert bool(torch.isfinite(w.grad).all())


# ------------------------------------------------------------------------------------------ voxelize

def _vox(points, voxel_size, **kw):
    return pointconv.voxelize(points, torch.ones(*points.shape[:2], 1, dtype=points.dtype), voxel_size, **kw)


@pytest.mark.parametrize("points,voxel_size,kw", [
    ([[0.0, 0, 0], [5e9, 0, 0]], 1.0, {}),  # wrapped to 705032704 before
    ([[0.0, 0, 0], [3e9, 0, 0]], 1.0, {}),  # wrapped negative ("indices must be non-negative")
    ([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], 0.1, dict(origin=[-1e12, 0, 0])),
    ([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], 1e-30, {}),  # int64 overflow ("origin must not exceed")
    ([[1e10, 0, 0], [0.5, 0, 0]], 1e-300, {}),  # the default origin itself overflows
])
def test_voxelize_coordinates_beyond_int32(points, voxel_size, kw):
    with pytest.raises(ValueError, match="voxel_size .* too small"):
        _vox(torch.tensor([points], dtype=torch.float64), voxel_size, **kw)


def test_voxelize_largest_int32_coordinate_is_exact():
    x, pv = _vox(torch.tensor([[[0.0, 0, 0], [2**31 - 2, 0, 0]]], dtype=torch.float64), 1.0)
    assert x.indices.tolist() == [[0, 0, 0, 0], [0, 2**31 - 2, 0, 0]]
    assert x.spatial_shape[0] == 2**31 - 1 and pv.tolist() == [[0, 1]]


def test_voxelize_grid_too_large_for_site_keys():
    with pytest.raises(ValueError, match="the voxels .voxel_size too small.* int64 site keys"):
        _vox(torch.tensor([[[0.0, 0, 0], [2e9, 2e9, 2e9]]], dtype=torch.float64), 1.0)


@pytest.mark.parametrize("origin,err,match", [
    ([NAN] * 3, ValueError, "origin must be finite"),
    ([0.0, INF, 0.0], ValueError, "origin must be finite"),
    ([0.0, 0.0], ValueError, "origin must hold 3 coordinates"),
    ("abc", TypeError, "origin must be"),
])
def test_bad_origin(origin, err, match):
    pts = torch.rand(1, 9, 3)
    with pytest.raises(err, match=match):
        _vox(pts, 0.3, origin=origin)
    x, _ = _vox(pts, 0.3)
    with pytest.raises(err, match=match):
        pointconv.devoxelize(x, pts, origin=origin)


@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
def test_devoxelize_tensor_without_voxels(mode):
    x, pv = pointconv.voxelize(torch.rand(1, 0, 3), torch.rand(1, 0, 2), 0.1)
    assert x.features.shape == (0, 2) and pv.shape == (1, 0)
    pts = torch.rand(1, 5, 3, requires_grad=True)
    out = pointconv.devoxelize(x, pts, mode=mode)
    assert out.shape == (1, 5, 2) and bool((out == 0).all())
    out.sum().backward()
    assert bool((pts.grad == 0).all())


def test_voxelize_empty_batch_round_trip():
    feats = torch.rand(0, 4, 2, requires_grad=True)
    x, pv = pointconv.voxelize(torch.rand(0, 4, 3), feats, 0.1)
    assert pv.shape == (0, 4) and x.features.shape == (0, 2)
    out = pointconv.devoxelize(x, torch.rand(0, 4, 3))
    assert out.shape == (0, 4, 2)
    out.sum().backward()
    assert feats.grad.shape == feats.shape
    with pytest.raises(ValueError, match="batch size"):  # a tensor with sites still needs its batch
        pointconv.devoxelize(_vox(torch.rand(1, 4, 3), 0.1)[0], torch.rand(0, 4, 3))


def test_devoxelize_far_points_read_nothing():
    pts = torch.rand(1, 6, 3, dtype=torch.float64)
    x, _ = _vox(pts, 0.25)
    far = torch.tensor([[[1e25, 0.1, 0.1], [-1e25, 0.1, 0.1]]], dtype=torch.float64)
    for mode in ("trilinear", "nearest"):
        assert bool((pointconv.devoxelize(x, far, mode=mode) == 0).all())


# --------------------------------------------------------------------------------------- pointwise

def _pw_inputs(B=1, N=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, N, 3, generator=g), torch.rand(B, N, 4, generator=g),
            torch.rand(5, 4, 3, 3, 3, generator=g))


def test_pointwise_neighbors_of_other_lengths_or_points():
    pts, f, W = _pw_inputs()
    nb = pointwise_neighbors(pts, 0.5)
    with pytest.raises(ValueError, match="neighbors were built for other points or lengths"):
        pointconv.pointwise_conv(pts, f, W, 0.5, lengths=torch.tensor([5]), neighbors=nb)
    with pytest.raises(ValueError, match="neighbors were built for other points or lengths"):
        pointconv.pointwise_conv(pts, f, W, 0.5, neighbors=pointwise_neighbors(torch.rand(1, 30, 3), 0.5))
    with pytest.raises(ValueError, match="neighbors were built for other points or lengths"):
        pointconv.nn.PointwiseConv3d(4, 5, 0.5)(pts + 1e-6, f, neighbors=nb)


def test_pointwise_neighbors_ignore_the_padding():
    """Padded points play no part: other padding values keep the structure valid."""
    pts, f, W = _pw_inputs(B=2)
    lengths = torch.tensor([20, 30])
    nb = pointwise_neighbors(pts, 0.3, 2, lengths=lengths)
    other = pts.clone()
    other[0, 20:] = 7.0
    out = pointconv.pointwise_conv(other, f, W, 0.3, 2, lengths=lengths, neighbors=nb)
    torch.testing.assert_close(out, pointconv.pointwise_conv(other, f, W, 0.3, 2, lengths=lengths))
    with pytest.raises(ValueError, match="other points or lengths"):  # same points, lengths differ
        pointconv.pointwise_conv(pts, f, W, 0.3, 2, lengths=torch.tensor([20, 29]), neighbors=nb)


@pytest.mark.parametrize("B,N", [(2, 0), (0, 5), (0, 0)])
def test_pointwise_conv_empty(B, N):
    f = torch.rand(B, N, 4, requires_grad=True)
    W = torch.rand(5, 4, 3, 3, 3, requires_grad=True)
    bias = torch.rand(5, requires_grad=True)
    out = pointconv.pointwise_conv(torch.rand(B, N, 3), f, W, 0.1, bias=bias)
    assert out.shape == (B, N, 5)
    out.sum().backward()
    assert bool((W.grad == 0).all()) and bool((bias.grad == 0).all()) and f.grad.shape == f.shape
    nb = pointwise_neighbors(torch.rand(B, N, 3), 0.1)
    assert pointconv.pointwise_conv(torch.rand(B, N, 3), f, W, 0.1, neighbors=nb).shape == (B, N, 5)
    layer = pointconv.nn.PointwiseConv3d(4, 8, 0.2, bias=True)
    assert layer(torch.rand(B, N, 3), torch.rand(B, N, 4)).shape == (B, N, 8)


def test_pointwise_cnn_empty_clouds():
    torch.manual_seed(0)
    model = pointconv.nn.PointwiseCNN(5)
    logits = model(torch.rand(2, 0, 3))
    # every pooled feature of an empty cloud is 0
    expected = model.head(torch.zeros(2, model.head[0].in_features))
    torch.testing.assert_close(logits, expected)
    logits.sum().backward()


@pytest.mark.parametrize("dilation", [2**62, 2**31])
def test_pointwise_dilation_too_large(dilation):
    pts, f, W = _pw_inputs()
    with pytest.raises(ValueError, match="dilation must be <= 1073741824"):
        pointconv.pointwise_conv(pts, f, W, 0.1, dilation=dilation)
    with pytest.raises(ValueError, match="dilation must be <="):
        pointwise_neighbors(pts, 0.1, [1, dilation])
    with pytest.raises(ValueError, match="dilation must be <="):
        pointconv.nn.PointwiseConv3d(4, 5, 0.1, dilation=dilation)


def test_pointwise_dilation_past_the_grid_names_it():
    # accepted dilations can still span more cells than the pair search's grid holds: the error
    # says so (it spoke of the points alone)
    pts = torch.tensor([[[0.0, 0.0, 0.0], [0.05, 0.0, 0.0]]])
    with pytest.raises(ValueError, match="windows of dilation 1048576 .* smaller dilation"):
        pointconv.pointwise_conv(pts, torch.ones(1, 2, 1), torch.ones(1, 1, 3, 3, 3), 0.1, dilation=2**20)


def test_pointwise_cnn_input_dtype():
    model = pointconv.nn.PointwiseCNN(5)
    with pytest.raises(TypeError, match="features has dtype torch.float64"):
        model(torch.rand(1, 20, 3), torch.rand(1, 20, 3, dtype=torch.float64))
    pts = torch.rand(2, 40, 3)
    # the coordinates as features (the default) take the layer's dtype: float64 points, or a
    # half-precision network on float32 coordinates (which must stay float32 / float64)
    torch.testing.assert_close(model(pts.double()), model(pts))
    for half in (torch.bfloat16, torch.float16):
        logits = copy.deepcopy(model).to(half)(pts)
        assert logits.dtype == half
        torch.testing.assert_close(logits.float(), model(pts), rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="dilations must be a non-empty sequence"):
        pointconv.nn.PointwiseCNN(5, dilations=())
    with pytest.raises(ValueError, match="neighbors must hold 4 structures"):
        model(pts, neighbors=5)


def test_pointwise_conv_parameter_dtypes():
    pts, f = torch.rand(1, 30, 3), torch.rand(1, 30, 2)
    w, b = torch.rand(3, 2, 3, 3, 3), torch.rand(3)
    for backend in ("torch", "reference"):  # (the torch path rounded float64 weights to float32)
        with pointconv.use_backend(backend):
            with pytest.raises(TypeError, match="weight has dtype torch.float64 but features has dtype torch.float32"):
                pointconv.pointwise_conv(pts, f, w.double(), 0.2)
            with pytest.raises(TypeError, match="bias has dtype torch.float64"):
                pointconv.pointwise_conv(pts, f, w, 0.2, bias=b.double())
            with pytest.raises(TypeError, match="features has dtype torch.float32 but the layer's parameters are "
                                                "torch.float64"):
                pointconv.nn.PointwiseConv3d(2, 3, 0.2).double()(pts, f)
            with pytest.raises(ValueError, match="features have 3 channels, this layer expects 2"):
                pointconv.nn.PointwiseConv3d(2, 3, 0.2)(pts, torch.rand(1, 30, 3))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_zero_channels_forward_and_backward(backend):
    g = torch.Generator().manual_seed(0)
    pts, idx = torch.rand(2, 20, 3, generator=g), torch.randint(-1, 20, (2, 20, 4), generator=g)
    with pointconv.use_backend(backend):
        for reduce in ("mean", "max", "sum", "weighted"):
            v = torch.rand(2, 20, 0, requires_grad=True)
            w = torch.rand(2, 20, 4) if reduce == "weighted" else None
            out = pointconv.aggregate(v, idx, reduce, w)
            assert out.shape == (2, 20, 0) and torch.autograd.grad(out.sum(), v)[0].shape == v.shape
        for cin, cout in ((0, 3), (2, 0)):
            f = torch.rand(2, 20, cin, requires_grad=True)
            w = torch.rand(cout, cin, 3, 3, 3, requires_grad=True)
            out = pointconv.pointwise_conv(pts, f, w, 0.3)
            assert out.shape == (2, 20, cout)
            gf, gw = torch.autograd.grad(out.sum(), (f, w))
            assert gf.shape == f.shape and gw.shape == w.shape
            assert bool((gw == 0).all()) and bool((gf == 0).all())  # nothing multiplies anything


# ------------------------------------------------------------------------------------------ layers

def test_radius_conv_bad_inputs():
    conv = pointconv.nn.RadiusConv(4, [8], radius=0.3, k=6)
    pts, f = torch.rand(1, 9, 3), torch.rand(1, 9, 4)
    with pytest.raises(ValueError, match="points must have D = 3"):
        conv(torch.rand(1, 9, 2), f)
    with pytest.raises(ValueError, match=r"center_lengths must lie in \[0, 2\]"):
        conv(pts, f, pts[:, :2], center_lengths=torch.tensor([3]))
    with pytest.raises(TypeError, match="features has dtype torch.float64"):
        conv(pts, f.double())
    with pytest.raises(TypeError, match="centers must be a torch.Tensor"):
        conv(pts, f, [[[0.0, 0, 0]]])
    with pytest.raises(ValueError, match="centers must have D = 3"):
        conv(pts, f, torch.rand(1, 2, 2))
    with pytest.raises(TypeError, match="centers has dtype torch.float64 but points has dtype torch.float32"):
        conv(pts, f, torch.rand(1, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="centers has batch size 2"):
        conv(pts, f, torch.rand(2, 2, 3))
    with pytest.raises(ValueError, match="centers has coordinates beyond"):  # (the search named it query)
        conv(pts, f, torch.full((1, 2, 3), 1e19))
    with pytest.raises(TypeError, match="mlp_channels must be a list or tuple"):
        pointconv.nn.RadiusConv(4, 8, radius=0.3, k=6)
    # the features take the layer's dtype, the coordinates stay float32 / float64 (the offsets
    # enter the MLP in the features' dtype): float64 points in a float32 layer, a float64 layer on
    # float32 points, and a half-precision layer on float32 points (it rejected every input)
    ref = conv(pts, f, pts[:, :2])
    torch.testing.assert_close(conv(pts.double(), f, pts[:, :2].double()), ref)
    out = copy.deepcopy(conv).double()(pts, f.double(), pts[:, :2])
    assert out.dtype == torch.float64 and out.shape == (1, 2, 8)
    torch.testing.assert_close(out.float(), ref)
    for half in (torch.bfloat16, torch.float16):
        out = copy.deepcopy(conv).to(half)(pts, f.to(half), pts[:, :2])
        assert out.dtype == half
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_knn_and_edge_conv_feature_dtype(dtype):
    pts, f = torch.rand(1, 9, 3), torch.rand(1, 9, 4)
    with pytest.raises(TypeError, match=f"features has dtype {dtype} but the layer's parameters are torch.float32"):
        pointconv.nn.KNNConv(4, 8, k=3)(pts, f.to(dtype))
    with pytest.raises(TypeError, match=f"features has dtype {dtype} but the layer's parameters are torch.float32"):
        pointconv.nn.EdgeConv(4, 8, k=3)(f.to(dtype))
    with pytest.raises(TypeError, match="features must be a floating-point tensor, got dtype torch.int64"):
        pointconv.nn.EdgeConv(4, 8, k=3)(torch.ones(1, 9, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="features has coordinates beyond"):  # searched as coordinates
        pointconv.nn.EdgeConv(4, 8, k=3)(torch.full((1, 9, 4), 1e19))
    conv = pointconv.nn.KNNConv(4, 8, k=3).double()
    ref = conv.linear(pointconv.aggregate(f.double(), pointconv.knn(pts, pts, 3, exclude_self=True).idx))
    torch.testing.assert_close(conv(pts, f.double()), ref)  # float32 points, float64 features


# ---------------------------------------------------------------------------------------- gaussian

@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("select", ["aniso", "euclidean"])
@pytest.mark.parametrize("iso", [True, False])
def test_gaussian_without_points(backend, select, iso):
    q = torch.rand(2, 4, 3, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, 0, 3, dtype=torch.float64, requires_grad=True)
    f = torch.rand(2, 0, 5, dtype=torch.float32, requires_grad=True)
    with pointconv.use_backend(backend):
        if iso:
            out = pointconv.knn_aggregate_iso(q, p, f, torch.ones(2, 0, 1, dtype=torch.float64), 3, select=select)
        else:
            out = pointconv.knn_aggregate_aniso(q, p, f, torch.ones(2, 0, 3, dtype=torch.float64),
                                                torch.rand(2, 0, 3, 3, dtype=torch.float64), 3, select=select)
    f_out, w, dists, idx = out
    assert f_out.shape == (2, 4, 5) and f_out.dtype == torch.float32 and bool((f_out == 0).all())
    assert w.shape == (2, 4, 3) and bool((w == 0).all())
    assert dists.shape == (2, 4, 3) and bool(torch.isinf(dists).all())
    assert idx.dtype == torch.int64 and bool((idx == -1).all())
    gq, = torch.autograd.grad(f_out.sum() + w.sum(), q)
    assert bool((gq == 0).all())


def test_gaussian_aniso_needs_R():
    q, p = torch.rand(1, 4, 3), torch.rand(1, 5, 3)
    with pytest.raises(TypeError, match="R must be a torch.Tensor, got NoneType"):
        pointconv.knn_aggregate_aniso(q, p, torch.rand(1, 5, 2), torch.ones(1, 5, 3), None, 3)
