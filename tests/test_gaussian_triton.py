"""knn_aggregate_aniso on the Triton backend (GaussianSum: kernel forward, kernel backward, double
backward in torch ops) against the torch backend and the reference: on CUDA when there is one, else
in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) at small sizes."""
import warnings

import pytest
import torch

import pointconv
from pointconv.gaussian import knn_aggregate_aniso_reference
from test_gaussian import check_nan_exponents_count_as_missing, check_overflowing_exponents_count_as_missing, make
from needs_triton import require_triton

require_triton()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _leaves(*tensors):
    return [t.to(DEV).clone().requires_grad_() for t in tensors]


def _outputs_and_grads(backend, inputs, K, lengths, select, weights):
    """The op's outputs, and the gradients of every input for a loss on the outputs that
    ``weights`` (f_out, w, dists) switch on: cotangents of any subset reach the kernels."""
    leaves = _leaves(*inputs)
    with pointconv.use_backend(backend):
        f_out, w, d, idx = pointconv.knn_aggregate_aniso(*leaves, K, p_lengths=lengths, select=select)
    g = torch.Generator().manual_seed(7)
    loss = 0
    for on, out in zip(weights, (f_out, w, d)):
        if on:
            cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEV, out.dtype)
            loss = loss + (torch.where(torch.isfinite(out), out, 0) * cot).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return [f_out, w, d, idx], grads


@pytest.mark.parametrize("select", ["aniso", "euclidean"])
@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_and_gradients_match_the_torch_backend(select, weights, dtype):
    # second cloud cut to 7 points (K = 9 > 7: padded slots); F = 70: two channel tiles
    inputs = make(B=2, Q=11, P=13, F=70, dtype=dtype, seed=sum(weights))
    lengths = torch.tensor([13, 7], device=DEV)
    ours, ours_g = _outputs_and_grads("triton", inputs, 9, lengths, select, weights)
    ref, ref_g = _outputs_and_grads("torch", inputs, 9, lengths, select, weights)
    for a, b in zip(ours[1:], ref[1:]):  # weights, dists, indices: bitwise
        assert torch.equal(a, b)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours[0], ref[0], rtol=tol, atol=tol)
    for a, b in zip(ours_g, ref_g):  # float32: sums of terms in the hundreds, in another order
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=tol * float(b.abs().max()))
    reached = {0, 1} | ({3, 4} if select == "aniso" or any(weights[:2]) else set()) | ({2} if weights[0] else set())
    for i, g in enumerate(ours_g):
        assert bool((g != 0).any()) == (i in reached)


def test_half_features_and_their_gradient():
    q, p, f, sigma, R = make(B=1, Q=9, P=12, F=6, seed=5)
    for backend in ("triton", "torch"):
        leaves = _leaves(q, p, f.half(), sigma, R)
        with pointconv.use_backend(backend):
            f_out = pointconv.knn_aggregate_aniso(*leaves, 4)[0]
        assert f_out.dtype == torch.float16
        grads = torch.autograd.grad(f_out.float().square().sum(), leaves)
        if backend == "triton":
            ours = (f_out, *grads)
    assert grads[2].dtype == torch.float16
    for a, b in zip(ours, (f_out, *grads)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)


def test_gradcheck_and_gradgradcheck_every_input_and_output():
    # float64 kernels; K = 5 > P = 4: a padded slot too (its dists are inf: compare the finite ones)
    q, p, f, sigma, R = make(B=1, Q=3, P=4, F=2, dtype=torch.float64, seed=3)
    leaves = _leaves(q, p, f, sigma, R)

    def fn(q, p, f, sigma, R):
        f_out, w, d, _ = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 5)
        return f_out, w, d[..., :4]

    with pointconv.use_backend("triton"):
        assert torch.autograd.gradcheck(fn, leaves)
        assert torch.autograd.gradgradcheck(fn, leaves)


def _eikonal_grads(agg, mlp, inputs):
    from test_gaussian import _sdf_losses

    leaves = _leaves(*inputs)
    mlp.zero_grad()
    _sdf_losses(agg, mlp, *leaves).backward()
    return [t.grad for t in leaves[1:]] + [prm.grad.clone() for prm in mlp.parameters()]


def test_eikonal_training_step_matches_the_reference(deterministic_mode):
    # the kernels are deterministic by construction; the double backward's torch ops (index_select's
    # backward on CUDA) need deterministic mode for the same bits on every run
    inputs = make(B=1, Q=30, P=25, F=6, dtype=torch.float64, seed=4)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1)).double().to(DEV)
    with pointconv.use_backend("triton"):
        ours = _eikonal_grads(pointconv.knn_aggregate_aniso, mlp, inputs)
        again = _eikonal_grads(pointconv.knn_aggregate_aniso, mlp, inputs)
    ref = _eikonal_grads(knn_aggregate_aniso_reference, mlp, inputs)
    for a, b, r in zip(ours, again, ref):
        assert torch.equal(a, b)  # no atomics: the same bits on every run
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
        assert bool((a != 0).any())


def test_third_and_fourth_order_match_the_torch_backend():
    # a third derivative differentiates the double backward's torch ops, a fourth differentiates those again
    inputs = make(B=1, Q=6, P=8, F=3, dtype=torch.float64, seed=9)

    def derivatives(backend):
        leaves = _leaves(*inputs)
        with pointconv.use_backend(backend):
            f_out, w, d, _ = pointconv.knn_aggregate_aniso(*leaves, 3)
        (gq,) = torch.autograd.grad((f_out.square().sum(-1) * w.sum(-1)).sum(), leaves[0], create_graph=True)
        second = torch.autograd.grad(gq.square().sum(), leaves, create_graph=True)
        third = torch.autograd.grad(sum(g.square().sum() for g in second), leaves, create_graph=True)
        return second + third + torch.autograd.grad(sum(g.square().sum() for g in third), leaves)

    for a, b in zip(derivatives("triton"), derivatives("torch")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_empty_inputs_have_zero_gradients():
    for Q, P in [(0, 5), (4, 0)]:
        leaves = _leaves(*make(B=2, Q=Q, P=P, F=3, seed=1))
        with pointconv.use_backend("triton"):
            f_out, w, d, idx = pointconv.knn_aggregate_aniso(*leaves, 3)
        assert bool((idx == -1).all()) and bool(torch.isinf(d).all()) and not bool(f_out.any())
        grads = torch.autograd.grad(f_out.sum() + w.sum(), leaves, allow_unused=True)
        assert all(g is None or not bool(g.any()) for g in grads)


_COTANGENTS = ("g_fout", "g_w", "g_m", "a_q", "a_p", "a_f", "a_s", "a_R")


@pytest.mark.parametrize("present", [_COTANGENTS, ("g_fout", "a_q"), ("g_w", "a_p"), ("g_m", "a_s"), ("g_m", "a_R"),
                                     ("g_fout", "g_w", "g_m", "a_f"), ("g_fout", "g_m", "a_q", "a_p", "a_f", "a_s", "a_R")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_backward_kernels_match_the_torch_ops(present, dtype):
    # every subset of cotangents switches kernel terms on and off; F = 70: two channel tiles
    from pointconv.gaussian._kernel_autograd import double_backward as torch_ops
    from pointconv.gaussian.select import select_aniso
    from pointconv.kernels.gaussian_sum_double import double_backward as kernels

    B, Q, P, F, K = 2, 5, 7, 70, 4
    q, p, f, sigma, R = (t.to(DEV) for t in make(B=B, Q=Q, P=P, F=F, dtype=dtype, seed=len(present)))
    idx = select_aniso(q, p, sigma, R, K, torch.tensor([7, 3], device=DEV))  # K > 3: padded slots
    g = torch.Generator().manual_seed(len(present))

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype)

    w = torch.exp(-rand(B, Q, K).abs()) * (idx >= 0)
    shapes = dict(g_fout=(B, Q, F), g_w=(B, Q, K), g_m=(B, Q, K), a_q=(B, Q, 3), a_p=(B, P, 3), a_f=(B, P, F),
                  a_s=(B, P, 3), a_R=(B, P, 3, 3))
    cot = {name: rand(*shapes[name]) if name in present else None for name in _COTANGENTS}
    ours = kernels(q, p, f, sigma, R, idx, w, **cot)
    ref = torch_ops(q, p, f, sigma, R, idx, w, **cot)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    for a, b in zip(ours, ref):
        if b is None:  # a term the cotangents do not reach
            assert a is None or not bool(a.any())
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's, in the interpreter
def test_overflowing_exponents_count_as_missing():
    check_overflowing_exponents_count_as_missing("triton", DEV)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
def test_nan_exponents_count_as_missing():  # (the warnings: NumPy's, in Triton's interpreter)
    check_nan_exponents_count_as_missing("triton", DEV)


def _grid_case(seed):
    """Ragged clouds for the grid selection: a uniform isotropic one, one
    with many copies of a few points (ties), one clustered with queries outside its box, one whose
    singular R gives no bound (scanned whole), one of 2 points (K past its length), an empty one."""
    B, Q, P, F = 6, 9, 42, 5
    q, p, f, sigma, R = make(B=B, Q=Q, P=P, F=F, seed=seed, aniso=50.0)
    sigma[0] = 40.0  # isotropic (R are rotations): m = 40 |q - p|^2, the bound is tight, stopping early fails
    p[1] = p[1, torch.arange(P) % 6]  # 6 distinct points, 7 copies each
    sigma[1], R[1] = sigma[1, torch.arange(P) % 6], R[1, torch.arange(P) % 6]
    p[2] = 0.5 + 0.05 * p[2]
    q[2] = 3 * q[2] - 1
    R[3, 11] = 0
    lengths = torch.tensor([P, P, P, 30, 2, 0])
    return q, p, f, sigma, R, lengths


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy's, in the interpreter: bounds of inf
@pytest.mark.parametrize("K", [1, 9])
def test_grid_selection_matches_the_torch_backend(monkeypatch, K):
    # clouds past _BRUTE_MAX_POINTS are searched on a grid, rings of cells until c |q - p|^2 bounds
    # the unscanned points' exponents; made 0 here so that small clouds take that path
    from pointconv.kernels import gaussian as kernels

    monkeypatch.setattr(kernels, "_BRUTE_MAX_POINTS", 0)
    grid_calls = []
    real = kernels._select_on_grid
    monkeypatch.setattr(kernels, "_select_on_grid", lambda *a: grid_calls.append(1) or real(*a))
    q, p, f, sigma, R, lengths = (t.to(DEV) for t in _grid_case(K))
    with pointconv.use_backend("torch"):
        want = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, K, p_lengths=lengths)
    with pointconv.use_backend("triton"):
        fused = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, K, p_lengths=lengths)  # no gradient: one pass
        leaves = _leaves(q, p, f, sigma, R)
        recorded = pointconv.knn_aggregate_aniso(*leaves, K, p_lengths=lengths)
    assert len(grid_calls) == 2
    for got in (fused, recorded):
        assert torch.equal(got[3], want[3]) and torch.equal(got[2], want[2]) and torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert (fused[3][5] == -1).all() and (fused[3][4][:, 2:] == -1).all()


def test_grid_selection_counts_nan_exponents_as_missing(monkeypatch):
    # a rotation row (1e38, -1e38, 0) makes u = inf - inf = NaN for that point at ordinary coordinates
    from pointconv.kernels import gaussian as kernels

    monkeypatch.setattr(kernels, "_BRUTE_MAX_POINTS", 0)
    q, p, f, sigma, R = make(B=1, Q=5, P=30, F=2, seed=4)
    p[0, 7] = q[0, 0] - 10.0  # q - p = (10, 10, 10) for the first query
    R[0, 7] = torch.tensor([[1e38, -1e38, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q, p, f, sigma, R = (t.to(DEV) for t in (q, p, f, sigma, R))
    with pointconv.use_backend("reference"):
        want = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 30)
    with warnings.catch_warnings(), pointconv.use_backend("triton"):
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow warnings, in Triton's interpreter
        got = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 30)
    assert 7 not in want[3][0, 0].tolist() and want[3][0, 0, -1] == -1  # the NaN point: missing
    assert torch.equal(got[3], want[3]) and torch.equal(got[2], want[2])


def _rotations(B, P, g):
    return torch.linalg.qr(torch.randn(B, P, 3, 3, generator=g, dtype=torch.float64))[0].float()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's over- and underflow warnings, in the interpreter
@pytest.mark.parametrize("case", ["bound past float32", "subnormal sigma", "subnormal u * u", "extent 1e13"])
def test_grid_selection_on_extreme_scales(monkeypatch, case):
    """Found by a review of the grid selection (each wrong or hung before its fix):
    a bound c past float32's range became inf and stopped every scan after one ring; subnormal
    terms (sigma of 3 * 2^-149, or u = 1e-22 d under sigma 1e38) put computed m below c |d|^2 by
    more than c's relative margin; a 1e13-wide cloud overflowed the grid's float32 cell size to inf,
    and inf - inf = NaN in the distance bound kept every ring going."""
    from pointconv.kernels import gaussian as kernels

    monkeypatch.setattr(kernels, "_BRUTE_MAX_POINTS", 0)
    g = torch.Generator().manual_seed(0)
    B, Q, P, K = 1, 16, 60, 4  # (the review's cases: smaller draws missed the subnormal ones)
    q, p, f = torch.rand(B, Q, 3, generator=g), torch.rand(B, P, 3, generator=g), torch.randn(B, P, 2, generator=g)
    R = _rotations(B, P, g)
    sigma = torch.full((B, P, 3), 1.0)
    if case == "bound past float32":
        q, p, K = 0.4 * q, 0.4 * p, 1
        sigma, R = torch.full((B, P, 3), 1e37), 10 * torch.eye(3).expand(B, P, 3, 3).contiguous()  # m = 1e39 |d|^2
    elif case == "subnormal sigma":
        sigma = torch.full((B, P, 3), 3 * 2.0 ** -149)
    elif case == "subnormal u * u":
        sigma, R = torch.full((B, P, 3), 1e38), 1e-22 * R
    else:
        q, p, sigma, K = 1e13 * q, 1e13 * p, torch.full((B, P, 3), 4e-25), 1
    q, p, f, sigma, R = (t.to(DEV) for t in (q, p, f, sigma, R))
    with pointconv.use_backend("torch"):
        want = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, K)
    with pointconv.use_backend("triton"):
        got = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, K)
    assert torch.equal(got[3], want[3]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("path", ["fused", "grid"])
def test_the_forward_reads_the_device_once(monkeypatch, path):
    # the value checks (finite q and p, sigma > 0, finite R) and the grid's coordinate bound in one
    # read; each read waits for a CUDA device (on CUDA: a synchronization). The grid selection's
    # grid and stopping bounds are built on the device (the bounds' eigenvalues once came from
    # torch.linalg.eigvalsh, which synchronizes; the grid from nonzero and a read cell count).
    from test_kernel_map_one_pass import SyncingOps
    from pointconv import _device_transfers
    from pointconv.kernels import gaussian as kernels

    if path == "grid":
        monkeypatch.setattr(kernels, "_BRUTE_MAX_POINTS", 0)
    q, p, f, sigma, R = (t.float().to(DEV) for t in make(B=2, Q=20, P=40, F=3))
    reads = []
    real = _device_transfers.host_floats
    monkeypatch.setattr(_device_transfers, "host_floats", lambda v: reads.append(v.numel()) or real(v))
    with pointconv.use_backend("triton"), SyncingOps() as ops:
        f_out, *_ = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 4)
    assert ops.seen == [] and reads == [4]
    with pointconv.use_backend("torch"):
        torch.testing.assert_close(f_out, pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 4)[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, in the interpreter
def test_stop_bounds_are_the_references_on_the_device():
    # cloud_stop_bounds (Jacobi sweeps in a kernel) against the torch reference (eigvalsh): the same
    # c up to float64 roundings far inside its margins, never above the exact smallest eigenvalue,
    # and the same subnormal margin
    from pointconv.gaussian._exponent import cloud_lower_bounds
    from pointconv.kernels.gaussian_grid import cloud_stop_bounds

    g = torch.Generator().manual_seed(3)
    B, P = 7, 300
    R = _rotations(B, P, g)
    sigma = torch.rand(B, P, 3, generator=g) * 10 + 0.1
    sigma[1] = 2.5  # isotropic: a triple eigenvalue, Jacobi's and the closed forms' hard case
    sigma[2, :, 1:] = 7.0  # a double one
    R[3] = R[3] + 0.2 * torch.randn(P, 3, 3, generator=g)  # general matrices, not rotations (well conditioned)
    sigma[4], R[4] = 1e30 * sigma[4], 1e-12 * R[4]  # large and small scales
    R[5, 17] = 0  # a singular matrix: no bound
    lengths = torch.tensor([P, P, P, P, P, 250, 0])
    sigma, R, lengths = sigma.to(DEV), R.to(DEV), lengths.to(DEV)
    c, margin = cloud_stop_bounds(sigma, R, lengths)
    ref = cloud_lower_bounds(sigma, R, lengths)
    want = (ref * (1 - 1e-5)).clamp(max=torch.finfo(torch.float32).max).float()
    torch.testing.assert_close(c, want, rtol=1e-6, atol=0)
    assert float(c[5]) == 0.0 and float(c[6]) == 0.0 and bool((c[:5] > 0).all())
    M = R.double().transpose(-1, -2) @ (sigma.double()[..., None] * R.double())
    exact = torch.linalg.eigvalsh(M)[..., 0]
    for b in range(5):
        assert float(c[b]) <= float(exact[b].min()) * (1 - 1e-6)
    top = torch.stack([sigma[b, :int(lengths[b])].double().amax() if int(lengths[b]) else torch.zeros((), dtype=torch.float64,
                       device=DEV) for b in range(B)])
    assert torch.equal(margin, (2.0 ** -144 * (1 + top)).float())
