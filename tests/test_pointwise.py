import pytest
import torch

import pointconv
from pointconv.conv import pointwise_conv_reference, pointwise_neighbors
from pointconv.conv import _cell_means
from pointconv.conv import pointwise as pointwise_module
from pointconv.conv.pointwise import pointwise_reference_loops


def cloud(kind, N=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(1, N, 3, generator=g, dtype=torch.float64)
    # a lattice of step 0.125 with cell size 0.25: cube faces (x_i +- (2s+1) * 0.125) and cell
    # borders fall exactly on lattice points, so the closed-cube and floor rules are exercised
    return torch.randint(0, 9, (1, N, 3), generator=g).double() * 0.125


@pytest.mark.parametrize("kind", ["uniform", "lattice"])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_matches_the_literal_semantics(kind, s):
    pts = cloud(kind, seed=s)
    g = torch.Generator().manual_seed(10 + s)
    feats = torch.randn(1, pts.shape[1], 3, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, 3, generator=g, dtype=torch.float64)
    vs = 0.25 if kind == "lattice" else 0.15
    loops = pointwise_reference_loops(pts, feats, weight, vs, s)
    torch.testing.assert_close(pointwise_conv_reference(pts, feats, weight, vs, s)[0], loops)
    torch.testing.assert_close(pointconv.pointwise_conv(pts, feats, weight, vs, s)[0], loops)


def test_lengths_padding_and_batches():
    g = torch.Generator().manual_seed(5)
    pts = torch.rand(2, 40, 3, generator=g, dtype=torch.float64)
    feats = torch.randn(2, 40, 2, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([40, 23])
    out = pointconv.pointwise_conv(pts, feats, weight, 0.2, 2, lengths=lengths)
    torch.testing.assert_close(out, pointwise_conv_reference(pts, feats, weight, 0.2, 2, lengths=lengths))
    # padded points change nothing: the same as the cloud cut at its length
    cut = pointconv.pointwise_conv(pts[1:, :23], feats[1:, :23], weight, 0.2, 2)
    torch.testing.assert_close(out[1, :23], cut[0])
    assert bool((out[1, 23:] == 0).all())


@pytest.mark.parametrize("fn", [pointconv.pointwise_conv, pointwise_conv_reference])
def test_nan_in_the_padding_changes_nothing(fn):
    # the weight gradient's one-pass products ran over every row, padded ones too: NaN * 0
    g = torch.Generator().manual_seed(6)
    pts = torch.rand(2, 30, 3, generator=g, dtype=torch.float64)
    feats = torch.randn(2, 30, 2, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([30, 17])
    grads = []
    for pad in (0.0, float("nan")):
        f = feats.clone()
        f[1, 17:] = pad
        f.requires_grad_()
        w = weight.clone().requires_grad_()
        out = fn(pts, f, w, 0.2, 1, lengths=lengths)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (f, w))))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gradients_to_second_order_and_not_to_coordinates():
    pts = cloud("uniform", N=12, seed=6)
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(1, 12, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda f, w: pointconv.pointwise_conv(pts, f, w, 0.3) ** 2  # noqa: E731
    torch.autograd.gradcheck(fn, (feats, weight))
    torch.autograd.gradgradcheck(fn, (feats, weight))
    p = pts.clone().requires_grad_()
    out = pointconv.pointwise_conv(p, feats, weight, 0.3)
    assert not out.grad_fn or torch.autograd.grad(out.sum(), p, allow_unused=True)[0] is None


def _grads(out, inputs, create_graph):
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad(out, inputs, g, create_graph=create_graph)


@pytest.mark.parametrize("create_graph", [False, True])
def test_row_blocks_and_int64_indices_match_the_reference(create_graph, monkeypatch):
    # blocks of 7 rows (not dividing the 2 x 30 rows), int64 CSR indices: the paths that large
    # clouds take; first-order gradients with and without create_graph (fused and composed passes)
    monkeypatch.setattr(_cell_means, "_BLOCK_ELEMENTS", 27 * 3 * 7)
    monkeypatch.setattr(_cell_means, "_INT32_MAX", 100)
    g = torch.Generator().manual_seed(11)
    pts = torch.rand(2, 30, 3, generator=g, dtype=torch.float64)
    feats = torch.randn(2, 30, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([30, 17])
    nbrs = pointwise_neighbors(pts, 0.25, 1, lengths=lengths)
    assert nbrs.gather.col.dtype == torch.int64 and nbrs.num_pairs > 100
    out = pointconv.pointwise_conv(pts, feats, weight, 0.25, 1, lengths=lengths, neighbors=nbrs)
    ref = pointwise_conv_reference(pts, feats, weight, 0.25, 1, lengths=lengths)
    torch.testing.assert_close(out, ref)
    for a, b in zip(_grads(out, (feats, weight), create_graph), _grads(ref, (feats, weight), False)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_are_computed_in_float32(dtype):
    pts = cloud("uniform", N=80, seed=12).float()
    g = torch.Generator().manual_seed(13)
    feats = torch.randn(1, 80, 4, generator=g).to(dtype)
    weight = torch.randn(5, 4, 3, 3, 3, generator=g)
    out = pointconv.pointwise_conv(pts, feats, weight, 0.2, 2)
    assert out.dtype == dtype
    expected = pointwise_conv_reference(pts, feats.float(), weight, 0.2, 2)
    # the float32 result rounded once: within half an ulp of ``dtype`` (plus float32 noise), which
    # a product computed in ``dtype`` itself misses
    torch.testing.assert_close(out.float(), expected, rtol=torch.finfo(dtype).eps / 2 + 1e-6, atol=1e-6)
    # float32 parameters with a bias: the result stays in the features' dtype on every backend
    bias = torch.randn(5, generator=g)
    outs = []
    for backend in ("torch", "reference"):
        with pointconv.use_backend(backend):
            outs.append(pointconv.pointwise_conv(pts, feats, weight, 0.2, 2, bias=bias))
    assert outs[0].dtype == outs[1].dtype == dtype
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_region_changes_nothing(dtype):
    """float32 features are convolved in float32 inside an autocast region, forward and backward
    (the forward's out= products escaped autocast, the weight gradient's did not: 3e-3 off), also
    for gradients taken inside the region, to second order."""
    g = torch.Generator().manual_seed(0)
    pts, v0, w0 = torch.rand(2, 300, 3, generator=g), torch.randn(2, 300, 8, generator=g), torch.randn(4, 8, 3, 3, 3, generator=g)

    def run(autocast, backward_inside):
        v, w = v0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = pointconv.pointwise_conv(pts, v, w, 0.2)
            if backward_inside:
                gv, gw = torch.autograd.grad((y * y).sum(), [v, w], create_graph=True)
        if not backward_inside:
            gv, gw = torch.autograd.grad((y * y).sum(), [v, w], create_graph=True)
        return y, gv, gw, torch.autograd.grad((gw * gw).sum() + (gv * gv).sum(), [v, w])

    for backend, inside in (("torch", True), ("torch", False), ("reference", False)):
        with pointconv.use_backend(backend):
            expect, got = run(False, inside), run(True, inside)
        for a, b in zip(got, expect):
            for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
                assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)


def test_module_shares_one_neighbor_structure():
    pts = cloud("uniform", N=60, seed=8).float()
    feats = torch.randn(1, 60, 9)
    nbrs = pointwise_neighbors(pts, 0.1, 2)
    layer = pointconv.nn.PointwiseConv3d(9, 9, 0.1, dilation=2)
    torch.testing.assert_close(layer(pts, feats, neighbors=nbrs), layer(pts, feats))
    with pytest.raises(ValueError, match="built for other points"):
        pointconv.nn.PointwiseConv3d(9, 9, 0.1, dilation=1)(pts, feats, neighbors=nbrs)
    with pytest.raises(TypeError, match="neighbors must be a PointwiseNeighbors"):
        layer(pts, feats, neighbors=[nbrs])


def test_the_adjoint_matrix_is_built_only_for_a_feature_gradient():
    """A first layer (input coordinates, no gradient) never builds the scatter matrix; a feature
    gradient builds it once and matches the reference's."""
    pts = cloud("uniform", N=80, seed=4)
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(1, 80, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    nbrs = pointwise_neighbors(pts, 0.15, 2)
    out = pointconv.pointwise_conv(pts, feats.detach(), weight, 0.15, 2, neighbors=nbrs)
    (gw,) = torch.autograd.grad(out.square().sum(), weight)
    assert nbrs._scatter is None
    out = pointconv.pointwise_conv(pts, feats, weight, 0.15, 2, neighbors=nbrs)
    gf, gw2 = torch.autograd.grad(out.square().sum(), (feats, weight))
    assert nbrs._scatter is not None
    ref = pointwise_conv_reference(pts, feats, weight, 0.15, 2)
    rf, rw = torch.autograd.grad(ref.square().sum(), (feats, weight))
    torch.testing.assert_close(gf, rf)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gw2, rw)


def test_several_dilations_share_one_grid():
    """A sequence of dilations gives the structures of one call per dilation (the windows built for
    the largest serve the smaller ones), padded clouds included."""
    g = torch.Generator().manual_seed(14)
    pts = torch.cat([cloud("uniform", N=70, seed=14), cloud("lattice", N=70, seed=15) * 0.5])
    lengths = torch.tensor([70, 41])
    several = pointwise_neighbors(pts, 0.125, [3, 1, 2], lengths=lengths)
    assert [n.dilation for n in several] == [3, 1, 2]
    for nbrs in several:
        one = pointwise_neighbors(pts, 0.125, nbrs.dilation, lengths=lengths)
        assert one.num_pairs > 0
        for a, b in [(nbrs.gather.crow, one.gather.crow), (nbrs.gather.col, one.gather.col),
                     (nbrs.gather.count, one.gather.count), (nbrs.scatter.col, one.scatter.col)]:
            assert torch.equal(a, b)
    feats = torch.randn(2, 70, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, 3, generator=g, dtype=torch.float64)
    out = pointconv.pointwise_conv(pts, feats, weight, 0.125, 2, lengths=lengths, neighbors=several[2])
    torch.testing.assert_close(out, pointwise_conv_reference(pts, feats, weight, 0.125, 2, lengths=lengths))
    with pytest.raises(ValueError, match="non-empty sequence"):
        pointwise_neighbors(pts, 0.125, [])
    with pytest.raises(TypeError, match="dilation must be an int"):
        pointwise_neighbors(pts, 0.125, [1, 2.0])


@pytest.mark.parametrize("repeated", [False, True])
def test_deterministic_outputs_and_gradients(monkeypatch, deterministic_mode, repeated):
    monkeypatch.setattr(_cell_means, "_BLOCK_ELEMENTS", 27 * 8 * 16)
    # repeated: two sites about 70 times each among distinct points, convolved as groups
    pts = (_repeated_cloud(1, 200, 2, seed=6) if repeated else cloud("uniform", N=200, seed=9)).float()
    assert (pointwise_neighbors(pts, 0.1).groups is not None) == repeated
    layer = pointconv.nn.PointwiseConv3d(8, 8, 0.1)
    results = []
    for _ in range(2):
        layer.zero_grad()
        feats = torch.randn(1, 200, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
        out = layer(pts, feats)
        out.square().sum().backward()
        results.append((out.detach(), feats.grad, layer.weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_same_bits_for_any_thread_count():
    """float32 gradients to second order, the weight's included (a reduction over every point:
    one block per thread, blocks summed in order), do not depend on torch's thread count."""
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(8, 2048, 3, generator=g)  # blocks of thousands of rows: GEMMs MKL would split
    feats = torch.randn(8, 2048, 9, generator=g)
    weight = torch.randn(9, 9, 3, 3, 3, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            f, w = feats.clone().requires_grad_(), weight.clone().requires_grad_()
            y = pointconv.pointwise_conv(pts, f, w, 0.1, 2)
            gf, gw = torch.autograd.grad(y.square().sum(), (f, w), create_graph=True)
            ggf, ggw = torch.autograd.grad(gf.square().sum() + gw.square().sum(), (f, w))
            results.append((y, gf, gw, ggf, ggw))
    finally:
        torch.set_num_threads(threads)
    for one, several in zip(*results):
        assert torch.equal(one, several)


def _repeated_cloud(B, N, sites, seed):
    """Clouds that repeat a few sites hundreds of times, with some distinct points among them."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.rand(B, sites, 3, generator=g, dtype=torch.float64)
    pts = pool[torch.arange(B)[:, None], torch.randint(0, sites, (B, N), generator=g)]
    loose = torch.rand(B, N, generator=g) < 0.3
    return torch.where(loose[..., None], torch.rand(B, N, 3, generator=g, dtype=torch.float64), pts)


def test_repeated_points_are_convolved_as_groups():
    """Hundreds of copies of a few sites: each of L copies pairs with all L (L^2 pairs; 20,000 copies
    of one point ran out of 12 GB). The structure is built over the groups of equal (snapped)
    points, and the result is the reference's, padding and dilations included."""
    pts = _repeated_cloud(2, 600, 6, seed=1)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 600, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([600, 451])
    structures = pointwise_neighbors(pts, 0.2, [1, 2], lengths=lengths)
    for s, nbrs in zip([1, 2], structures):
        assert nbrs.groups is not None and nbrs.gather.num_rows < 2 * 600 / 2
        assert nbrs.num_pairs < 600 * 27  # about 1 / 30 of the point pairs
        out = pointconv.pointwise_conv(pts, feats, weight, 0.2, s, lengths=lengths, neighbors=nbrs)
        torch.testing.assert_close(out, pointwise_conv_reference(pts, feats, weight, 0.2, s, lengths=lengths))
        assert bool((out[1, 451:] == 0).all())
    # a cloud with few repeats keeps the point structure (the same bits as before)
    assert pointwise_neighbors(cloud("uniform", N=300, seed=3), 0.2).groups is None


def test_grouped_structure_gradients_to_second_order(monkeypatch):
    """Grouping forced on a small cloud with copies: features and weights, to second order."""
    monkeypatch.setattr(pointwise_module, "_COSTLY_REPEATS", -1)
    pts = _repeated_cloud(1, 14, 3, seed=4)
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(1, 14, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert pointwise_neighbors(pts, 0.3).groups is not None
    fn = lambda f, w: pointconv.pointwise_conv(pts, f, w, 0.3) ** 2  # noqa: E731
    torch.autograd.gradcheck(fn, (feats, weight))
    torch.autograd.gradgradcheck(fn, (feats, weight))
    ref = lambda f, w: pointwise_conv_reference(pts, f, w, 0.3) ** 2  # noqa: E731
    for a, b in zip(torch.autograd.grad(fn(feats, weight).sum(), (feats, weight)),
                    torch.autograd.grad(ref(feats, weight).sum(), (feats, weight))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cell_size=0.0), ValueError, "cell_size must be a finite number > 0"),
    (dict(dilation=0), ValueError, "dilation must be >= 1"),
    (dict(weight=torch.zeros(2, 3, 3, 3)), ValueError, r"weight must have shape \(C_out, 2, 3, 3, 3\)"),
    (dict(lengths=torch.tensor([9])), ValueError, r"lengths must lie in \[0, 5\]"),
    (dict(points=torch.full((1, 5, 3), float("nan"))), ValueError, "points contains NaN"),
    (dict(features=torch.zeros(2, 5, 2)), ValueError, r"features must have shape \(1, 5, C\)"),
    (dict(weight=torch.zeros(3, 2, 3, 3, 3, dtype=torch.long)), TypeError, "weight must be floating point"),
    (dict(bias=torch.zeros(2)), ValueError, r"bias must have shape \(3,\)"),
    (dict(bias=torch.zeros(3, dtype=torch.long)), TypeError, "bias must be floating point"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(points=torch.rand(1, 5, 3), features=torch.rand(1, 5, 2), weight=torch.zeros(3, 2, 3, 3, 3),
                cell_size=0.1, dilation=1, lengths=None, bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pointconv.pointwise_conv(args["points"], args["features"], args["weight"], args["cell_size"],
                                 args["dilation"], lengths=args["lengths"], bias=args["bias"])
