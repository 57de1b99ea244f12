import pytest
import torch

import pointconv
from pointconv.conv import aggregate_reference


def _inputs(B=2, P=9, Q=6, k=5, C=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, P, C, generator=g, dtype=dtype)
    idx = torch.randint(-1, P, (B, Q, k), generator=g)
    idx[0, 0] = -1  # a query without neighbors
    weights = torch.randn(B, Q, k, generator=g, dtype=dtype)
    return values, idx, weights


@pytest.mark.parametrize("reduce", ["mean", "max", "sum", "weighted"])
def test_aggregate_matches_reference(reduce, device):
    values, idx, weights = (t.to(device) for t in _inputs())
    w = weights if reduce == "weighted" else None
    out = pointconv.aggregate(values, idx, reduce, w)
    torch.testing.assert_close(out.cpu(), aggregate_reference(values.cpu(), idx.cpu(), reduce, None if w is None else w.cpu()))
    assert bool((out[0, 0] == 0).all())


@pytest.mark.parametrize("reduce", ["mean", "max", "sum", "weighted"])
def test_aggregate_gradients_to_second_order(reduce):
    values, idx, weights = _inputs(P=6, Q=4, k=3, C=2, seed=1)
    values.requires_grad_()
    weights.requires_grad_()
    if reduce == "weighted":
        fn = lambda v, w: pointconv.aggregate(v, idx, "weighted", w) ** 2  # noqa: E731
        args = (values, weights)
    else:
        fn = lambda v: pointconv.aggregate(v, idx, reduce) ** 2  # noqa: E731
        args = (values,)
    torch.autograd.gradcheck(fn, args)
    torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("reduce", ["mean", "max", "sum", "weighted"])
def test_aggregate_in_an_autocast_region_keeps_the_values_dtype(reduce):
    """float32 values are summed in float32 inside an autocast region, gradients taken there too
    (the sums ran as bf16 einsums copied into float32 tensors: errors of 4e-3 to 3e-2)."""
    values, idx, weights = _inputs(P=300, Q=200, k=16, C=24, seed=2, dtype=torch.float32)

    def run(autocast):
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = pointconv.aggregate(v, idx, reduce, w if reduce == "weighted" else None)
            grads = torch.autograd.grad((out * out).sum(), [v, w], allow_unused=True, materialize_grads=True)
        return out, *grads

    for a, b in zip(run(True), run(False)):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    # fp16 values in a bf16 region (autocast's cat refused the max's fp16 blocks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = pointconv.aggregate(values.half(), idx, reduce, weights.half() if reduce == "weighted" else None)
    assert half.dtype == torch.float16


def test_max_gradient_reaches_a_real_minus_infinity_after_padding():
    # padding used to be filled with -inf: it won the tie with a real -inf neighbor and took the
    # gradient with it, so the slot order changed the gradient
    v = torch.tensor([[[1.0], [float("-inf")], [2.0]]], requires_grad=True)
    for row in ([-1, 1], [1, -1], [-1, -1, 1, -1]):
        out = pointconv.aggregate(v, torch.tensor([[row]]), "max")
        assert out.item() == float("-inf")
        assert torch.autograd.grad(out.sum(), v)[0].flatten().tolist() == [0.0, 1.0, 0.0]


def test_max_gathers_blocks_of_queries(monkeypatch):
    # one gather of the whole (B, Q, k, C) peaked at k times the output (32 neighbors: 32x)
    import importlib
    from pointconv import _weighted_sum
    aggregate_module = importlib.import_module("pointconv.conv.aggregate")
    monkeypatch.setattr(_weighted_sum, "_CHUNK_ELEMENTS", 2 * 5 * 4 * 3)  # 3 queries of 2 clouds a block
    blocks = []
    real = aggregate_module.gather
    monkeypatch.setattr(aggregate_module, "gather", lambda v, i: blocks.append(i.shape) or real(v, i))
    values, idx, _ = _inputs(Q=7, k=5, C=4, seed=2)
    values.requires_grad_()
    out = pointconv.aggregate(values, idx, "max")
    assert blocks == [(2, 3, 5), (2, 3, 5), (2, 1, 5)]
    torch.testing.assert_close(out, aggregate_reference(values, idx, "max"), rtol=0, atol=0)
    grad = torch.autograd.grad(out.square().sum(), values)[0]
    expect = torch.autograd.grad(aggregate_reference(values, idx, "max").square().sum(), values)[0]
    torch.testing.assert_close(grad, expect, rtol=0, atol=0)
    assert pointconv.aggregate(values, idx[:, :0], "max").shape == (2, 0, 4)
    for reduce in ("max", "mean"):  # a batch of no clouds (the block size divided by B)
        assert pointconv.aggregate(values[:0], idx[:0], reduce).shape == (0, 7, 4)


@pytest.mark.parametrize("B,Q", [(0, 3), (2, 0)])
def test_aggregate_reference_of_no_queries(B, Q):
    values = torch.rand(B, 4, 3)
    idx = torch.zeros(B, Q, 2, dtype=torch.int64)
    for reduce in ("mean", "max", "sum"):
        assert torch.equal(aggregate_reference(values, idx, reduce), pointconv.aggregate(values, idx, reduce))
        assert aggregate_reference(values, idx, reduce).shape == (B, Q, 3)


def test_adjacency_is_the_aggregation():
    values, idx, weights = _inputs(B=2)
    adj = pointconv.adjacency(idx, values.shape[1])
    assert adj.shape == (2 * idx.shape[1], 2 * values.shape[1])
    got = torch.sparse.mm(adj, values.reshape(-1, values.shape[2]).float()).reshape(2, idx.shape[1], -1)
    torch.testing.assert_close(got.double(), pointconv.aggregate(values, idx, "mean"), rtol=1e-6, atol=1e-6)
    one = pointconv.adjacency(idx[1], values.shape[1], weights=weights[1], normalize=None)
    torch.testing.assert_close(torch.sparse.mm(one, values[1]), pointconv.aggregate(values[1:], idx[1:], "weighted", weights[1:])[0])
    w = weights[1].clone().requires_grad_()
    torch.sparse.mm(pointconv.adjacency(idx[1], values.shape[1], weights=w, normalize=None), values[1]).sum().backward()
    assert w.grad is not None and bool((w.grad[idx[1] < 0] == 0).all())


def test_adjacency_in_float64_is_the_aggregation_and_differentiable():
    values, idx, weights = _inputs(B=2)  # float64
    adj = pointconv.adjacency(idx, values.shape[1], dtype=torch.float64)
    assert adj.dtype == torch.float64
    got = torch.sparse.mm(adj, values.reshape(-1, values.shape[2])).reshape(2, idx.shape[1], -1)
    torch.testing.assert_close(got, pointconv.aggregate(values, idx, "mean"), rtol=1e-12, atol=1e-12)
    assert pointconv.adjacency(idx, values.shape[1], weights=weights).dtype == weights.dtype
    assert pointconv.adjacency(idx, values.shape[1], weights=weights, dtype=torch.float32).dtype == torch.float32
    w = weights[1].clone().requires_grad_()

    def product(w, v):
        return torch.sparse.mm(pointconv.adjacency(idx[1], values.shape[1], weights=w), v)

    torch.autograd.gradcheck(product, (w, values[1].clone().requires_grad_()))
    # second order: through the features' gradient exact (against the dense matrix); through the
    # weights' gradient torch's sparse backward is first-order only, which raises (it came out
    # wrong or missing, silently)
    def dense(w):
        valid = idx[1] >= 0
        wn = torch.where(valid, w, 0)
        total = wn.sum(-1, keepdim=True)
        wn = torch.where(total != 0, wn / torch.where(total != 0, total, 1), 0)
        rows = torch.arange(idx.shape[1])[:, None].expand_as(idx[1])
        return torch.zeros(idx.shape[1], values.shape[1], dtype=w.dtype).index_put(
            (rows[valid], idx[1][valid]), wn[valid], accumulate=True)

    for make in (product, lambda w, v: dense(w) @ v):
        wg, vg = w.detach().clone().requires_grad_(), values[1].clone().requires_grad_()
        gv, = torch.autograd.grad(make(wg, vg).square().sum(), vg, create_graph=True)
        second = torch.autograd.grad(gv.square().sum(), (wg, vg))
        if make is product:
            ours = second
        else:
            for a, b in zip(ours, second):
                torch.testing.assert_close(a, b)
    wg, vg = w.detach().clone().requires_grad_(), values[1].clone().requires_grad_()
    gw, = torch.autograd.grad(product(wg, vg).square().sum(), wg, create_graph=True)
    with pytest.raises(RuntimeError, match="weights cannot be differentiated again"):
        torch.autograd.grad(gw.square().sum(), (wg, vg))
    with pytest.raises(TypeError, match="dtype must be a floating"):
        pointconv.adjacency(idx, 9, dtype=torch.int64)
    with pytest.raises(TypeError, match="weights must be a floating-point"):
        pointconv.adjacency(idx, 9, weights=idx)


def test_knn_conv_against_manual():
    g = torch.Generator().manual_seed(2)
    pts = torch.rand(2, 30, 3, generator=g)
    feats = torch.randn(2, 30, 4, generator=g)
    lengths = torch.tensor([30, 17])
    conv = pointconv.nn.KNNConv(4, 5, k=6, reduce="mean")
    out = conv(pts, feats, lengths)
    idx = pointconv.knn(pts, pts, 6, query_lengths=lengths, points_lengths=lengths, exclude_self=True).idx
    expect = conv.linear(aggregate_reference(feats, idx, "mean"))
    torch.testing.assert_close(out[0], expect[0])
    torch.testing.assert_close(out[1, :17], expect[1, :17])
    assert bool((out[1, 17:] == 0).all())


def test_radius_conv_centers_and_padding():
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(1, 40, 3, generator=g, dtype=torch.float64)
    feats = torch.randn(1, 40, 2, generator=g, dtype=torch.float64)
    centers_idx = pointconv.farthest_point_sample(pts, 8)
    centers = pts[0, centers_idx[0]][None]
    conv = pointconv.nn.RadiusConv(2, [8, 16], radius=0.3, k=10).double()
    out = conv(pts, feats, centers)
    assert out.shape == (1, 8, 16)
    res = pointconv.ball_query(centers, pts, 0.3, 10)
    for m in range(8):
        js = res.idx[0, m][res.idx[0, m] >= 0]
        x = torch.cat([feats[0, js], pts[0, js] - centers[0, m]], 1)
        torch.testing.assert_close(out[0, m], conv.mlp(x).max(0).values)
    torch.autograd.gradcheck(lambda f: conv(pts, f, centers), (feats.clone().requires_grad_(),))


def test_edge_conv_uses_feature_space_neighbors():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 25, 6, generator=g, dtype=torch.float64)
    conv = pointconv.nn.EdgeConv(6, 8, k=4).double()
    out = conv(feats, torch.tensor([25, 10]))
    idx = pointconv.knn(feats, feats, 4, query_lengths=torch.tensor([25, 10]), points_lengths=torch.tensor([25, 10])).idx
    i = 7
    fi = feats[0, i].expand(4, -1)
    expect = conv.mlp(torch.cat([fi, feats[0, idx[0, i]] - fi], 1)).max(0).values
    torch.testing.assert_close(out[0, i], expect)
    assert bool((out[1, 10:] == 0).all())
    torch.autograd.gradgradcheck(lambda f: conv(f), (feats[:1, :12].clone().requires_grad_(),))


def test_edge_conv_on_half_precision_features():
    """DGCNN under autocast feeds one EdgeConv's bf16 output to the next, whose kNN runs on the
    exact float32 values of those features; a half-precision layer takes half features."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 40, 6, generator=g)
    first, second = pointconv.nn.EdgeConv(6, 8, k=4), pointconv.nn.EdgeConv(8, 5, k=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = first(feats)
        assert hidden.dtype == torch.bfloat16
        out = second(hidden)
        assert torch.equal(out, second(hidden.float()))  # the same neighbors, the same bf16 products
    half = pointconv.nn.EdgeConv(6, 8, k=4).to(torch.float16)
    y = half(feats.half())
    assert y.dtype == torch.float16
    ref = pointconv.nn.EdgeConv(6, 8, k=4)
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    torch.testing.assert_close(y.float(), ref(feats.half().float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("call,exc,match", [
    (lambda v, i, w: pointconv.aggregate(v, i, "median"), ValueError, "reduce must be one of"),
    (lambda v, i, w: pointconv.aggregate(v, i, "weighted"), ValueError, "weights are required"),
    (lambda v, i, w: pointconv.aggregate(v, i.clamp(max=3) + 9, "sum"), ValueError, r"idx must lie in"),
    (lambda v, i, w: pointconv.aggregate(v, i, "weighted", w[..., :2]), ValueError, "weights must have the shape"),
    (lambda v, i, w: pointconv.aggregate(v[0], i, "sum"), ValueError, r"values must have shape \(B, P, C\)"),
    (lambda v, i, w: pointconv.aggregate(v.long(), i, "sum"), TypeError, "values must be a floating-point tensor"),
    (lambda v, i, w: pointconv.adjacency(i, 3), ValueError, r"idx must lie in \[-1, 2\]"),
    (lambda v, i, w: pointconv.adjacency(i, 9, normalize="col"), ValueError, "normalize must be"),
    (lambda v, i, w: pointconv.nn.KNNConv(3, 4, 0), ValueError, "k must be >= 1"),
    (lambda v, i, w: pointconv.nn.RadiusConv(3, [8], -1.0, 4), ValueError, "radius must be"),
    (lambda v, i, w: pointconv.nn.KNNConv(3, 4, 2)(torch.rand(1, 5, 3), torch.rand(1, 5, 2)), ValueError, "expects 3"),
])
def test_bad_input(call, exc, match):
    values, idx, weights = _inputs()
    with pytest.raises(exc, match=match):
        call(values, idx, weights)


def test_module_reprs_show_their_settings_and_integer_inputs_are_refused_plainly():
    assert repr(pointconv.nn.PointwiseConv3d(3, 9, 0.1, dilation=2)) == \
        "PointwiseConv3d(3, 9, cell_size=0.1, dilation=2, bias=False)"
    assert "k=8, reduce='max', exclude_self=False" in repr(pointconv.nn.KNNConv(3, 4, 8, "max", exclude_self=False))
    assert "radius=0.2, k=16, reduce='max'" in repr(pointconv.nn.RadiusConv(3, [8], 0.2, 16))
    assert "in_channels=3, k=20" in repr(pointconv.nn.EdgeConv(3, 8, 20))
    # (the message advised layer.to(torch.int64), which torch refuses)
    with pytest.raises(TypeError, match="features must be a floating-point tensor, got dtype torch.int64"):
        pointconv.nn.KNNConv(3, 4, 2)(torch.rand(1, 5, 3), torch.ones(1, 5, 3, dtype=torch.int64))


def test_torch_func_grad_on_the_reference_backend():
    # as the README says: torch.func.grad runs on the reference backend; the weighted sums'
    # autograd Function had no setup_context, so aggregate and the layers built on it raised
    g = torch.Generator().manual_seed(3)
    p = torch.rand(2, 30, 3, generator=g, dtype=torch.float64)
    f = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    idx = pointconv.knn(p, p, 5).idx
    conv = pointconv.nn.KNNConv(4, 6, 5).double()
    losses = [lambda x: pointconv.aggregate(x, idx, "mean").square().sum(),
              lambda x: pointconv.aggregate(x, idx, "weighted", w).square().sum(),
              lambda x: pointconv.aggregate(x, idx, "max").square().sum(),
              lambda x: conv(p, x).square().sum()]
    with pointconv.use_backend("reference"):
        for loss in losses:
            x = f.clone().requires_grad_()
            expect = torch.autograd.grad(loss(x), x)[0]
            torch.testing.assert_close(torch.func.grad(loss)(f), expect, rtol=0, atol=0)


def test_a_compiled_model_around_the_ops_gives_the_same_values_and_gradients():
    """Under torch.compile the ops run eagerly between graph breaks (they read values, call scipy
    and threads): a compiled step gives the eager step's loss and gradients, again at a new size."""
    lin = torch.nn.Linear(4, 4)

    def step(p, f):
        idx = pointconv.knn(p, p, 4, exclude_self=True).idx
        return lin(pointconv.aggregate(f, idx, "max")).square().sum()

    compiled = torch.compile(step, backend="eager")
    g = torch.Generator().manual_seed(0)
    for n in (12, 17):
        p, f = torch.rand(2, n, 3, generator=g), torch.randn(2, n, 4, generator=g, requires_grad=True)
        expect, got = step(p, f), compiled(p, f)
        assert torch.equal(got, expect)
        for a, b in zip(torch.autograd.grad(got, [f, lin.weight]), torch.autograd.grad(expect, [f, lin.weight])):
            assert torch.equal(a, b)
