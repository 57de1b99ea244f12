"""torch.func's grad and jvp, and forward-mode AD, on the default (torch) backend: the same
derivatives as torch.autograd. The searches and index structures run on the inputs' values with
the transforms suspended (``pointconv._func_transforms``); the bilinear autograd Functions have a
``setup_context`` and a ``jvp``. vmap stops at the inputs' data-dependent checks (README)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import pointconv
import pointconv.sparse as spconv

# torch.func.jvp's first call scripts torch's own decompositions (torch's warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

g = torch.Generator().manual_seed(0)
P = torch.rand(2, 40, 3, generator=g, dtype=torch.float64)
F = torch.randn(2, 40, 4, generator=g, dtype=torch.float64)
W = torch.randn(5, 4, 3, 3, 3, generator=g, dtype=torch.float64)
SIGMA = 30 + 40 * torch.rand(2, 40, 3, generator=g, dtype=torch.float64)
R = torch.linalg.qr(torch.randn(2, 40, 3, 3, generator=g, dtype=torch.float64))[0]
VOXELS = pointconv.voxelize(P, F, 0.25)[0]
torch.manual_seed(0)
SUBM = spconv.SubMConv3d(4, 3, 3).double()
STRIDED = spconv.SparseConv3d(4, 3, 2, 2).double()
KNN_CONV = pointconv.nn.KNNConv(4, 6, 5).double()


def finite(d):
    return torch.where(torch.isfinite(d), d, 0)


CASES = {  # name: (a scalar loss of one input, that input)
    "knn wrt query": (lambda q: finite(pointconv.knn(q, P, 5).dists).square().sum(), P[:, :12] + 0.01),
    "self knn (exclude_self)": (lambda p: finite(pointconv.knn(p, p, 4, exclude_self=True).dists).sum(), P),
    "knn in 16-D (brute force)": (lambda p: finite(pointconv.knn(p, p, 3).dists).square().sum(),
                                  torch.rand(1, 30, 16, generator=g, dtype=torch.float64)),
    "ball_query": (lambda q: finite(pointconv.ball_query(q, P, 0.3, 4).dists).sum(), P[:, :12] + 0.01),
    "NeighborIndex built inside": (lambda p: finite(pointconv.NeighborIndex(p).knn(P[:, :9], 3).dists).sum(), P),
    "farthest_point_sample + gather": (
        lambda p: pointconv.gather(p, pointconv.farthest_point_sample(p, 10)[..., None]).square().sum(), P),
    "aggregate mean": (lambda f: pointconv.aggregate(f, pointconv.knn(P, P, 4).idx, "mean").square().sum(), F),
    "KNNConv wrt features": (lambda f: KNN_CONV(P, f).square().sum(), F),
    "pointwise_conv wrt features": (lambda f: pointconv.pointwise_conv(P, f, W, 0.1).square().sum(), F),
    "pointwise_conv wrt weight": (lambda w: pointconv.pointwise_conv(P, F, w, 0.1).square().sum(), W),
    "SubMConv3d": (lambda f: SUBM(VOXELS.replace_feature(f)).features.square().sum(), VOXELS.features),
    "SparseConv3d": (lambda f: STRIDED(VOXELS.replace_feature(f)).features.square().sum(), VOXELS.features),
    "voxelize -> SubMConv3d -> devoxelize": (
        lambda f: pointconv.devoxelize(SUBM(pointconv.voxelize(P, f, 0.25)[0]), P).square().sum(), F),
    "devoxelize wrt points": (lambda p: pointconv.devoxelize(VOXELS, p).square().sum(), P),
    "knn_aggregate_aniso wrt query": (
        lambda q: pointconv.knn_aggregate_aniso(q, P, F, SIGMA, R, 4)[0].square().sum(), P[:, :10] + 0.01),
    "knn_aggregate_aniso wrt features": (
        lambda f: pointconv.knn_aggregate_aniso(P[:, :10], P, f, SIGMA, R, 4)[0].square().sum(), F),
}


def _reverse(loss, x):
    x = x.detach().clone().requires_grad_()
    return torch.autograd.grad(loss(x), x)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_func_grad_and_jvp_equal_autograd(name):
    loss, x = CASES[name]
    expect = _reverse(loss, x)
    torch.testing.assert_close(torch.func.grad(loss)(x), expect, rtol=1e-12, atol=1e-12)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    _, jvp = torch.func.jvp(loss, (x,), (tangent,))
    torch.testing.assert_close(jvp, (expect * tangent).sum(), rtol=1e-10, atol=1e-10)
    with fwAD.dual_level():
        dual_out = loss(fwAD.make_dual(x, tangent))
        torch.testing.assert_close(fwAD.unpack_dual(dual_out).tangent, jvp, rtol=1e-12, atol=1e-12)


def test_func_grad_of_grad():
    # second order through the weighted sums and the search (an Eikonal-style loss)
    def loss(q):
        return pointconv.knn_aggregate_aniso(q, P, F, SIGMA, R, 4)[0].sum()

    def eikonal(q):
        return (torch.func.grad(loss)(q).norm(dim=-1) - 1).square().sum()

    q = P[:, :10] + 0.01
    x = q.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
    expect = torch.autograd.grad((grad.norm(dim=-1) - 1).square().sum(), x)[0]
    torch.testing.assert_close(torch.func.grad(eikonal)(q), expect, rtol=1e-10, atol=1e-10)


def test_vmap_stops_at_the_checks():
    # (a bool() or an item() of a batched value: vmap's error for each)
    with pytest.raises(RuntimeError, match=r"data-dependent control flow|calling \.item\(\)"):
        torch.func.vmap(lambda q: pointconv.knn(q[None], P[:1], 3).dists)(P[0, :5, None].expand(5, 4, 3))


SUBM32 = spconv.SubMConv3d(4, 3, 3)
VOXELS32 = pointconv.voxelize(P.float(), F.float(), 0.25)[0]
TRITON_CASES = {  # float32, tiny: the interpreter runs every program in NumPy
    "knn": (lambda q: finite(pointconv.knn(q, P[:1, :20].float(), 3).dists).square().sum(), P[:1, :5].float() + 0.01),
    "ball_query": (lambda q: finite(pointconv.ball_query(q, P[:1, :20].float(), 0.4, 3).dists).sum(),
                   P[:1, :5].float() + 0.01),
    "SubMConv3d": (lambda f: SUBM32(VOXELS32.replace_feature(f)).features.square().sum(), VOXELS32.features),
}


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_func_grad_and_jvp_on_the_triton_backend(name):
    # the values handed to the kernels must be plain tensors: a detach inside the transforms
    # wrapped them again, and the sparse kernels' tables were built lazily inside them
    from needs_triton import require_triton
    require_triton()
    loss, x = TRITON_CASES[name]
    with pointconv.use_backend("triton"):
        expect = _reverse(loss, x)
        torch.testing.assert_close(torch.func.grad(loss)(x), expect, rtol=1e-5, atol=1e-5)
        tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(torch.func.jvp(loss, (x,), (tangent,))[1], (expect * tangent).sum(),
                                   rtol=1e-4, atol=1e-4)


def test_gaussian_kernels_raise_for_forward_ad_rather_than_drop_it():
    # the fused kernel (no autograd at all) took duals that did not require grad: no tangent, silently
    from needs_triton import require_triton
    require_triton()
    q, p, f = P[:1, :4].float(), P[:1, :12].float(), F[:1, :12].float()
    s, r = SIGMA[:1, :12].float(), R[:1, :12].float()
    with pointconv.use_backend("triton"), fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="jvp"):
            pointconv.knn_aggregate_aniso(fwAD.make_dual(q, torch.ones_like(q)), p, f, s, r, 3)


@pytest.mark.parametrize("create_graph", [True, False])
def test_forward_over_reverse_through_the_pointwise_convolution(monkeypatch, create_graph):
    # the tangent of a weight gradient: the backward's products ran with dual tensors, on pool
    # threads that had forward-mode AD on (a Function's forward has it off) and in the one-pass
    # path, whose out= products refuse duals (NotImplementedError)
    from pointconv.conv import _cell_means
    monkeypatch.setattr(_cell_means, "_BLOCK_ELEMENTS", 27 * 4 * 8)  # many blocks: the pool's threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = W.clone().requires_grad_()
        tangent = torch.randn(F.shape, generator=torch.Generator().manual_seed(2), dtype=F.dtype)

        def loss(f):
            return pointconv.pointwise_conv(P, f, w, 0.1).square().sum()

        f = F.clone().requires_grad_()
        (gw,) = torch.autograd.grad(loss(f), w, create_graph=True)
        expect = (torch.autograd.grad(gw.sum(), f)[0] * tangent).sum()
        with fwAD.dual_level():
            (gw,) = torch.autograd.grad(loss(fwAD.make_dual(F, tangent).requires_grad_()), w,
                                        create_graph=create_graph)
            torch.testing.assert_close(fwAD.unpack_dual(gw).tangent.sum(), expect, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


def test_func_grad_of_grad_through_the_gaussian_kernels():
    # the Triton Gaussian Functions (forward, backward, double backward) have a setup_context:
    # an Eikonal loss's grad of grad equals torch.autograd's
    from needs_triton import require_triton
    require_triton()
    q, p, f = P[:1, :4].float(), P[:1, :12].float(), F[:1, :12].float()
    s, r = SIGMA[:1, :12].float(), R[:1, :12].float()

    def sdf(x):
        return pointconv.knn_aggregate_aniso(x, p, f, s, r, 3)[0].sum()

    def eikonal(x):
        return (torch.func.grad(sdf)(x).norm(dim=-1) - 1).square().sum()

    with pointconv.use_backend("triton"):
        x = q.clone().requires_grad_()
        (grad,) = torch.autograd.grad(sdf(x), x, create_graph=True)
        expect = torch.autograd.grad((grad.norm(dim=-1) - 1).square().sum(), x)[0]
        torch.testing.assert_close(torch.func.grad(sdf)(q), grad.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.func.grad(eikonal)(q), expect, rtol=1e-5, atol=1e-6)
