"""The Triton kernels against the reference: on CUDA when there is one, else in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py) at small sizes."""
import pytest
import torch

import pointconv
from pointconv.neighbors import ball_query_reference, knn_reference
from pointconv.neighbors._distance import radius_squared
from pointconv.neighbors._reference import search_reference
from pointconv.neighbors.sampling import _fps_torch
from clouds import make_cloud
from needs_triton import require_triton

require_triton()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
from pointconv.kernels import knn as knn_kernels  # noqa: E402  (after TRITON_INTERPRET is set)
from pointconv.kernels.fps import farthest_point_sample_triton  # noqa: E402


def _ref(q, p, k, r2, ql, pl, exclude_self=False):
    return search_reference(q, p, k, radius2=r2, query_lengths=ql, points_lengths=pl, exclude_self=exclude_self)


def _two_clouds(kind, radius, nq, np_, q_len, p_len, seeds):
    """Queries and points (2 clouds each, the second cut to the given lengths), their lengths, and
    the squared radius (None for kNN)."""
    q = make_cloud(kind, 2, nq, seed=seeds[0], device=DEV)
    p = make_cloud(kind, 2, np_, seed=seeds[1], device=DEV)
    ql, pl = torch.tensor([nq, q_len], device=DEV), torch.tensor([np_, p_len], device=DEV)
    return q, p, ql, pl, None if radius is None else radius_squared(radius, torch.float32)


@pytest.mark.parametrize("kind,k,radius", [("uniform", 16, None), ("lattice", 5, None), ("clustered", 20, 0.08)])
def test_brute_kernel(kind, k, radius):
    q, p, ql, pl, r2 = _two_clouds(kind, radius, 40, 50, 13, 9, seeds=(1, 2))
    d, i = knn_kernels.search_brute(q, p, k, r2, ql, pl, False)
    rd, ri = _ref(q, p, k, r2, ql, pl)
    assert torch.equal(i, ri) and torch.equal(d, rd)


def test_brute_kernel_other_dimension_and_exclude_self():
    p = make_cloud("duplicated", 1, 40, 5, seed=3, device=DEV)
    pl = torch.tensor([40], device=DEV)
    d, i = knn_kernels.search_brute(p, p, 6, None, pl, pl, True)
    rd, ri = _ref(p, p, 6, None, pl, pl, True)
    assert torch.equal(i, ri) and torch.equal(d, rd)


@pytest.mark.parametrize("kind,k,radius", [("uniform", 8, None), ("surface", 4, None), ("lattice", 6, 0.9)])
def test_grid_kernel(kind, k, radius):
    q, p, ql, pl, r2 = _two_clouds(kind, radius, 24, 60, 7, 11, seeds=(4, 5))
    grid = knn_kernels.Grid(p, pl, k_hint=k)
    assert int(grid.dims.prod(1).max()) > 1  # a real grid, not one cell
    d, i = knn_kernels.search_grid(q, grid, k, r2, ql, False)
    rd, ri = _ref(q, p, k, r2, ql, pl)
    assert torch.equal(i, ri) and torch.equal(d, rd)


def test_grid_kernel_exclude_self_and_far_queries():
    p = make_cloud("clustered", 1, 50, seed=6, device=DEV)
    pl = torch.tensor([50], device=DEV)
    grid = knn_kernels.Grid(p, pl, k_hint=5)
    d, i = knn_kernels.search_grid(p, grid, 5, None, pl, True)
    rd, ri = _ref(p, p, 5, None, pl, pl, True)
    assert torch.equal(i, ri)
    q = p[:, :6] * 3 - 5  # queries outside the points' box
    ql = torch.tensor([6], device=DEV)
    d, i = knn_kernels.search_grid(q, grid, 5, None, ql, False)
    rd, ri = _ref(q, p, 5, None, ql, pl)
    assert torch.equal(i, ri) and torch.equal(d, rd)


def test_grid_kernel_on_a_cloud_wider_than_float32_volumes():
    # a 1e13-wide cloud (coordinates well inside the kNN's 5e18 limit): its box's volume overflowed
    # float32 in Grid, the cell size became inf, and inf - inf = NaN in the distance bound kept every
    # ring of the kernel going (a hang)
    g = torch.Generator().manual_seed(2)
    p = (1e13 * torch.rand(1, 40, 3, generator=g)).to(DEV)
    pl = torch.tensor([40], device=DEV)
    grid = knn_kernels.Grid(p, pl, k_hint=3)
    assert bool(torch.isfinite(grid.h).all())
    d, i = knn_kernels.search_grid(p[:, :5], grid, 3, None, torch.tensor([5], device=DEV), False)
    rd, ri = _ref(p[:, :5], p, 3, None, torch.tensor([5], device=DEV), pl)
    assert torch.equal(i, ri) and torch.equal(d, rd)


def test_public_api_on_the_triton_backend():
    q = make_cloud("uniform", 1, 20, seed=7, device=DEV)
    p = make_cloud("uniform", 1, 30, seed=8, device=DEV)
    with pointconv.use_backend("triton"):
        a = pointconv.knn(q, p, 4)
        b = pointconv.ball_query(q, p, 0.3, 4)
        c = pointconv.farthest_point_sample(p, 10)
    assert torch.equal(a.idx, knn_reference(q, p, 4).idx)
    assert torch.equal(b.idx, ball_query_reference(q, p, 0.3, 4).idx)
    assert torch.equal(c, _fps_torch(p, 10, torch.tensor([30], device=DEV), torch.zeros(1, dtype=torch.long, device=DEV)))


def test_fps_kernel():
    p = make_cloud("duplicated", 3, 40, seed=9, device=DEV)
    lengths = torch.tensor([40, 17, 0], device=DEV)
    start = torch.tensor([0, 3, 0], device=DEV)
    assert torch.equal(farthest_point_sample_triton(p, 25, lengths, start), _fps_torch(p, 25, lengths, start))


def test_weighted_sum_kernels_match_torch():
    from pointconv import _weighted_sum as torch_ops
    from pointconv.kernels import weighted_sum as kernels

    g = torch.Generator().manual_seed(10)
    Q, P, k, C = 37, 11, 5, 70  # C spans two channel tiles
    w = torch.randn(Q, k, generator=g).to(DEV)
    f = torch.randn(P, C, generator=g).to(DEV)
    gq = torch.randn(Q, C, generator=g).to(DEV)
    idx = torch.randint(-1, P, (Q, k), generator=g).to(DEV)
    torch.testing.assert_close(kernels.gather_sum(w, f, idx), torch_ops._gather_sum(w, f, idx))
    torch.testing.assert_close(kernels.pair_dot(gq, f, idx), torch_ops._pair_dot(gq, f, idx))
    a = kernels.scatter_sum(w, gq, idx, P)
    torch.testing.assert_close(a, torch_ops._scatter_sum(w, gq, idx, P))
    assert torch.equal(a, kernels.scatter_sum(w, gq, idx, P))  # no atomics: bitwise repeatable


def test_gaussian_aggregation_on_the_triton_backend():
    from pointconv.gaussian import knn_aggregate_aniso_reference
    from test_gaussian import make

    q, p, f, sigma, R = (t.to(DEV) for t in make(Q=40, P=50))
    lengths = torch.tensor([50, 9], device=DEV)
    with pointconv.use_backend("triton"):
        out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 16, p_lengths=lengths)
    ref = knn_aggregate_aniso_reference(q, p, f, sigma, R, 16, p_lengths=lengths)
    for a, b in zip(out[1:], ref[1:]):
        assert torch.equal(a, b)
    torch.testing.assert_close(out[0], ref[0])


@pytest.mark.parametrize("K,F,fdtype", [(16, 70, torch.float32), (5, 3, torch.float16)])
def test_fused_gaussian_forward_without_gradients(K, F, fdtype):
    # no gradient recorded: one kernel selects, weighs and sums (F = 70: two channel tiles)
    from pointconv.gaussian import aggregate as gaussian_aggregate
    from pointconv.gaussian import knn_aggregate_aniso_reference
    from test_gaussian import make

    q, p, f, sigma, R = (t.to(DEV) for t in make(Q=37, P=50, F=F, seed=K))
    lengths = torch.tensor([50, 9], device=DEV)
    with pointconv.use_backend("triton"), torch.no_grad():
        assert gaussian_aggregate._fused_forward(q, p, f, sigma, R, K, "aniso")
        out = pointconv.knn_aggregate_aniso(q, p, f.to(fdtype), sigma, R, K, p_lengths=lengths)
    with pointconv.use_backend("triton"):
        assert not gaussian_aggregate._fused_forward(q, p, f.requires_grad_(), sigma, R, K, "aniso")
    ref = knn_aggregate_aniso_reference(q, p, f.detach().to(fdtype), sigma, R, K, p_lengths=lengths)
    assert out[0].dtype == fdtype
    for a, b in zip(out[1:], ref[1:]):  # weights, exponents, indices: bitwise
        assert torch.equal(a, b)
    tol = 1e-5 if fdtype == torch.float32 else 2e-3
    torch.testing.assert_close(out[0].float(), ref[0].float(), rtol=tol, atol=tol)


def _pointwise_case(seed, cin=5, cout=6):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(2, 40, 3, generator=g).to(DEV)
    feats = torch.randn(2, 40, cin, generator=g).to(DEV).requires_grad_()
    weight = torch.randn(cout, cin, 3, 3, 3, generator=g).to(DEV).requires_grad_()
    return pts, feats, weight, torch.tensor([40, 23], device=DEV)


@pytest.mark.parametrize("s", [1, 2])
def test_pointwise_kernels_match_the_torch_path(s):
    from pointconv.conv import _cell_means, pointwise_neighbors
    from pointconv.kernels import pointwise as pointwise_kernels
    pts, feats, weight, lengths = _pointwise_case(20 + s, cin=5, cout=20)  # C_out = 20: two dot tiles of 16
    A = pointwise_neighbors(pts, 0.3, s, lengths=lengths).gather
    x = feats.detach().reshape(80, 5)
    w = _cell_means.weight_matrix(weight.detach())
    gout = torch.randn(80, 20, generator=torch.Generator().manual_seed(s)).to(DEV)
    with pointconv.use_backend("torch"):
        conv, wgrad = _cell_means._conv(x, w, A), _cell_means._weight_grad(x, gout, A)
    values = A.values(torch.float32)
    torch.testing.assert_close(pointwise_kernels.cell_conv(A.crow, A.col, values, x, w), conv)
    torch.testing.assert_close(pointwise_kernels.cell_weight_grad(A.crow, A.col, values, x, gout), wgrad)


@pytest.mark.parametrize("repeated", [False, True])
def test_pointwise_conv_on_the_triton_backend_to_second_order(repeated, monkeypatch):
    from pointconv.conv import pointwise as pointwise_module
    from pointconv.conv import pointwise_conv_reference, pointwise_neighbors
    pts, feats, weight, lengths = _pointwise_case(30)
    if repeated:  # every other point a copy of the first: the structure over groups of equal points
        monkeypatch.setattr(pointwise_module, "_COSTLY_REPEATS", -1)
        pts = pts.clone()
        pts[:, ::2] = pts[:, :1]
        assert pointwise_neighbors(pts, 0.3, 1, lengths=lengths).groups is not None

    def derivatives(conv):
        out = conv(pts, feats, weight, 0.3, 1, lengths=lengths)
        gf, gw = torch.autograd.grad(out.square().sum(), (feats, weight), create_graph=True)
        return [out, gf, gw, *torch.autograd.grad(gf.square().sum() + gw.square().sum(), (feats, weight))]

    with pointconv.use_backend("triton"):
        ours = derivatives(pointconv.pointwise_conv)
        again = derivatives(pointconv.pointwise_conv)
    for a, b, r in zip(ours, again, derivatives(pointwise_conv_reference)):
        assert torch.equal(a, b)  # no atomics: the same bits on every run
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3)  # float32, second derivatives in the hundreds


def test_k_past_the_register_top_k_takes_the_torch_path():
    # a (BQ, 2 k) merge tile past 2^20 elements failed in Triton (k = 32,769 here); above
    # TRITON_MAX_K the search and the Gaussian selection run on the torch path of the same device
    from pointconv._backend import TRITON_MAX_K
    from test_gaussian import make

    q, p, f, sigma, R = (t.to(DEV) for t in make(Q=3, P=10, F=2))
    k = TRITON_MAX_K + 1
    with pointconv.use_backend("triton"):
        got = [pointconv.knn(q, p, k), pointconv.ball_query(q, p, 0.5, k), pointconv.knn_aggregate_aniso(q, p, f, sigma, R, k)]
    with pointconv.use_backend("reference"):
        want = [pointconv.knn(q, p, k), pointconv.ball_query(q, p, 0.5, k), pointconv.knn_aggregate_aniso(q, p, f, sigma, R, k)]
    for a, b in zip(got, want):
        assert torch.equal(a[-1], b[-1]) and a[-1].shape[-1] == k  # indices, -1 padded past the 10 points


def test_index_over_clouds_without_points():
    # no points at all (P = 0): the Triton backend built a grid of nothing and failed in amin()
    q = torch.rand(2, 3, 3, device=DEV)
    empty = torch.zeros(2, 0, 3, device=DEV)
    with pointconv.use_backend("triton"):
        index = pointconv.NeighborIndex(empty)
        d, i = index.knn(q, 2)
        assert bool((i == -1).all()) and bool(torch.isinf(d).all())
        assert bool((index.ball_query(q, 0.5, 2).idx == -1).all())


def test_every_kernel_launch_runs_on_its_tensors_device():
    # Triton launches on the current CUDA device, not the tensors' (cuda:1 tensors with cuda:0
    # current would run on the wrong GPU): every function that launches a kernel sets the device
    import ast
    import importlib
    import inspect
    import pkgutil

    import pointconv.kernels as kernels

    launchers = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"pointconv.kernels.{info.name}")
        for node in ast.parse(inspect.getsource(module)).body:
            launches = [c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Subscript)]
            if isinstance(node, ast.FunctionDef) and launches:
                launchers.append(f"{info.name}.{node.name}")
                assert getattr(getattr(module, node.name), "launches_on_tensor_device", False), launchers[-1]
    assert len(launchers) >= 15


def test_on_tensor_device_sets_the_first_cuda_tensors_device(monkeypatch):
    import contextlib

    from pointconv.kernels import on_tensor_device

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())

    class FakeCuda(torch.Tensor):  # a CPU tensor that says it lives on cuda:1
        is_cuda = True

        @property
        def device(self):
            return torch.device("cuda", 1)

    launch = on_tensor_device(lambda *a, **kw: "launched")
    assert launch(3, torch.zeros(2)) == "launched" and entered == []  # CPU tensors: nothing to set
    fake = torch.zeros(2).as_subclass(FakeCuda)
    assert launch(torch.zeros(1), x=fake) == "launched" and entered == [torch.device("cuda", 1)]
