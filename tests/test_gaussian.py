import pytest
import torch

import pointconv
from pointconv.gaussian import knn_aggregate_aniso_reference, knn_aggregate_iso_reference
from pointconv.gaussian import select as select_module


def rotations(B, P, g, dtype):
    Q, _ = torch.linalg.qr(torch.randn(B, P, 3, 3, generator=g, dtype=torch.float64))
    return Q.to(dtype)


def make(B=2, Q=60, P=40, F=5, dtype=torch.float32, seed=0, aniso=10.0, rot=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, Q, 3, generator=g, dtype=torch.float64).to(dtype)
    p = torch.rand(B, P, 3, generator=g, dtype=torch.float64).to(dtype)
    f = torch.randn(B, P, F, generator=g, dtype=torch.float64).to(dtype)
    sigma = (1 + aniso * torch.rand(B, P, 3, generator=g, dtype=torch.float64)).to(dtype) * 20
    R = rotations(B, P, g, dtype) if rot else torch.rand(B, P, 3, 3, generator=g, dtype=torch.float64).to(dtype)
    return q, p, f, sigma, R


def assert_same(out, ref, exact_f=False):
    f_out, w, d, i = out
    rf, rw, rd, ri = ref
    assert torch.equal(i, ri)
    assert torch.equal(d, rd)
    assert torch.equal(w, rw)
    torch.testing.assert_close(f_out, rf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("select", ["aniso", "euclidean"])
@pytest.mark.parametrize("aniso,rot", [(0.0, True), (10.0, True), (100.0, True), (5.0, False)])
@pytest.mark.parametrize("small_cloud", [select_module._SMALL_CLOUD, 0])  # 0: the GEMM path ranks these clouds
def test_matches_reference(select, aniso, rot, small_cloud, device, monkeypatch):
    monkeypatch.setattr(select_module, "_SMALL_CLOUD", small_cloud)
    q, p, f, sigma, R = (t.to(device) for t in make(aniso=aniso, rot=rot))
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 8, select=select)
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 8, select=select))


def _count(monkeypatch, name):
    calls = []
    orig = getattr(select_module, name)
    monkeypatch.setattr(select_module, name, lambda *a: calls.append(1) or orig(*a))
    return calls


def test_tree_path_for_large_clouds_is_exact(monkeypatch):
    monkeypatch.setattr(select_module, "_TREE_CANDIDATE_COST", 0)  # as if the tree always paid
    used = _count(monkeypatch, "_select_tree")
    q, p, f, sigma, R = make(Q=100, P=500)
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 16)
    assert len(used) == 2
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 16))


@pytest.mark.parametrize("aniso, tree", [(0.0, True), (2000.0, False)])
def test_tree_or_gemm_by_the_candidates_the_tree_needs(monkeypatch, aniso, tree):
    """Isotropic widths: the tree needs about 2K candidates a query and pays from a few thousand
    points. Widths 1000x apart (spread ~1e3, ~3e4 K candidates): the GEMM, however large the
    cloud (the tree took 38 s where the GEMM took 0.8 s, Q = 12,288, P = 16,384; the rule before
    took the tree above 65,536 points whatever the widths)."""
    used_tree, used_gemm = _count(monkeypatch, "_select_tree"), _count(monkeypatch, "_select_gemm")
    q, p, f, sigma, R = make(B=1, Q=40, P=3000, seed=7, aniso=aniso)
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 8)
    assert (len(used_tree), len(used_gemm)) == ((1, 0) if tree else (0, 1))
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 8))
    assert select_module._tree_pays(10**7, 8, select_module.exponent_bounds(sigma[0], R[0])[1]) == tree


def test_tree_path_with_exponents_in_the_subnormal_range(monkeypatch):
    """float32 points 1e-25 apart with sigma 1e30: every computed m underflows to about 0, so the
    K smallest are ties broken by index over the whole cloud, not the K nearest points."""
    monkeypatch.setattr(select_module, "_TREE_CANDIDATE_COST", 0)
    used = _count(monkeypatch, "_select_tree")
    q, p, f, sigma, R = make(B=1, Q=30, P=300, seed=3)
    q, p, sigma = q * 1e-25, p * 1e-25, sigma * 1e30
    assert_same(pointconv.knn_aggregate_iso(q, p, f, sigma[..., :1], 6),
                knn_aggregate_iso_reference(q, p, f, sigma[..., :1], 6))
    assert used


def test_tree_path_takes_more_candidate_rounds(monkeypatch):
    monkeypatch.setattr(select_module, "_TREE_CANDIDATE_COST", 0)
    q, p, f, sigma, R = make(Q=200, P=300, aniso=2000.0)
    rounds = _count(monkeypatch, "_rank")
    orig_tree = select_module._select_tree
    # spread = 0: start from K candidates whatever the anisotropy, so later rounds must run
    monkeypatch.setattr(select_module, "_select_tree", lambda *a: orig_tree(*a[:-1], 0.0))
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 12)
    assert len(rounds) >= 4  # two clouds, each needing more than one round
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 12))


def test_tree_path_over_repeated_points(monkeypatch):
    """Points repeated hundreds of times: the kd-tree is built over one point per group of identical
    points (``GroupedTree``) and its candidates expand to the group's points; the answer is exact."""
    from pointconv.neighbors import _grouped_tree
    monkeypatch.setattr(select_module, "_TREE_CANDIDATE_COST", 0)
    grouped = []
    real = _grouped_tree.GroupedTree
    monkeypatch.setattr(select_module, "build_tree", lambda p: grouped.append(1) or real(p.double().numpy()))
    q, p, f, sigma, R = make(B=1, Q=80, P=600, seed=4)
    p = p[:, torch.randint(0, 6, (600,), generator=torch.Generator().manual_seed(5))]
    assert _grouped_tree.repeats_are_costly(p[0].double().numpy())
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 10)
    assert grouped
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 10))


def test_precisions_past_float64_have_no_tree_bound():
    # R^T diag(sigma) R overflows: eigvalsh failed to converge on its infinities (a crash where
    # the reference finds no neighbor: every exponent is inf)
    g = torch.Generator().manual_seed(0)
    q, p, f = (torch.randn(1, n, c, generator=g, dtype=torch.float64) for n, c in ((5, 3), (200, 3), (200, 2)))
    sigma = torch.ones(1, 200, 3, dtype=torch.float64)
    R = torch.eye(3, dtype=torch.float64).expand(1, 200, 3, 3) * 1e160
    assert select_module.exponent_bounds(sigma[0], R[0]) == (0.0, float("inf"))
    assert_same(pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 1), knn_aggregate_aniso_reference(q, p, f, sigma, R, 1))


def test_singular_R_has_no_tree_bound_and_uses_the_gemm(monkeypatch):
    monkeypatch.setattr(select_module, "_TREE_CANDIDATE_COST", 0)
    gemm = _count(monkeypatch, "_select_gemm")
    q, p, f, sigma, R = make(Q=50, P=80)
    R[:, 3] = 0  # no lower bound on m from this point
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 12)
    assert len(gemm) == 2
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_small_clouds_rank_every_exponent_in_one_pass(monkeypatch, dtype, device):
    """A batch of small ragged clouds (empty ones, K past a cloud's length, repeated points whose
    exponents tie, a point whose exponent overflows) next to a large one: the small clouds in
    one pass of every exponent, the large one on the GEMM, each exact. (A call per small cloud
    cost 16 ms: 500 clouds of 48 points took 8 s.)"""
    gemm, small = _count(monkeypatch, "_select_gemm"), _count(monkeypatch, "_select_small_clouds")
    B, P = 40, 100
    q, p, f, sigma, R = make(B=B, Q=7, P=P, F=3, dtype=dtype, seed=11)
    lengths = torch.randint(0, 20, (B,), generator=torch.Generator().manual_seed(1))
    lengths[[0, 5]] = 0
    lengths[3] = select_module._SMALL_CLOUD  # the largest small cloud
    lengths[7] = P  # past _SMALL_CLOUD: the GEMM
    lengths[2] = 9
    p[1, 1:6] = p[1, :1]  # copies: equal exponents, ranked by index
    sigma[1, 1:6] = sigma[1, :1]
    R[1, 1:6] = R[1, :1]
    sigma[2, 0] = 1e38  # this point's exponent overflows: missing, like padding
    q, p, f, sigma, R = (t.to(device) for t in (q, p, f, sigma, R))
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 12, p_lengths=lengths)
    assert len(small) == 1 and len(gemm) == 1
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 12, p_lengths=lengths))
    assert (out[3][lengths == 0] == -1).all() and (out[3][8:][lengths[8:] < 12] == -1).any()


def test_gemm_near_ties_fall_back_to_dense_rows(monkeypatch):
    monkeypatch.setattr(select_module, "_SMALL_CLOUD", 0)  # (64 points: else every exponent, no GEMM)
    dense = _count(monkeypatch, "_select_dense")
    _, _, f, _, _ = make(Q=80, P=64)
    g = torch.arange(4.0)
    p = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(1, 64, 3).repeat(2, 1, 1)
    q = p[:, ::3] + 0.5  # cell centers: many lattice points at exactly the same exponent
    sigma = torch.full((2, 64, 3), 2.0)
    R = torch.eye(3).expand(2, 64, 3, 3).contiguous()
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 9)
    assert dense
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_widens_its_candidates_before_the_dense_pass(monkeypatch, dtype):
    """Precisions 1e6 times larger on one axis widen the GEMM's rounding margin past the spread of
    the K + 4 best exponents: every row failed its certificate and took the dense Q x P pass (34 s
    at 50K points, float64). Rounds of 4x more candidates certify them; the answer is exact."""
    monkeypatch.setattr(select_module, "_TREE_CANDIDATE_COST", 1e9)  # the GEMM path, whatever the size
    dense = _count(monkeypatch, "_select_dense")
    g = torch.Generator().manual_seed(5)
    P = 6000
    p, q = torch.rand(1, P, 3, generator=g, dtype=dtype), torch.rand(1, 60, 3, generator=g, dtype=dtype)
    f = torch.randn(1, P, 4, generator=g, dtype=dtype)
    sigma = torch.tensor([100.0, 100.0, 1e8], dtype=dtype).expand(1, P, 3).contiguous()
    R = torch.linalg.qr(torch.randn(1, P, 3, 3, generator=g, dtype=torch.float64))[0].to(dtype)
    exponent_ranks = []
    real_rank = select_module._rank
    monkeypatch.setattr(select_module, "_rank", lambda m, cand, K: exponent_ranks.append(cand.shape[1]) or real_rank(m, cand, K))
    out = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 16)
    assert not dense and max(exponent_ranks) > 20  # (K + 4 = 20 candidates did not suffice)
    assert_same(out, knn_aggregate_aniso_reference(q, p, f, sigma, R, 16))


def test_reduced_precision_matmul_ranks_in_float64(monkeypatch):
    """Under TF32 / bf16 matmul settings the float32 GEMM's error bound would not hold."""
    ranked = []
    topk = torch.topk
    def spy(x, *args, **kwargs):  # the GEMM's output is the only floating-point top-k (the rest rank int64 keys)
        if x.is_floating_point():
            ranked.append(x.dtype)
        return topk(x, *args, **kwargs)

    monkeypatch.setattr(select_module.torch, "topk", spy)
    q, p, f, sigma, R = make(Q=50, P=80)
    expect = knn_aggregate_aniso_reference(q, p, f, sigma, R, 8)
    assert_same(pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 8), expect)
    torch.set_float32_matmul_precision("high")
    try:
        assert_same(pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 8), expect)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert ranked == [torch.float32] * 2 + [torch.float64] * 2  # one GEMM per cloud


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_region_changes_nothing(dtype):
    # autocast would run the selection GEMM and the exponents' products in fp16 / bf16, outside the
    # certified float32 bound: 7 of these 300 queries got another neighbor under bf16
    g = torch.Generator().manual_seed(0)
    q, p, f = torch.rand(1, 300, 3, generator=g), torch.rand(1, 2000, 3, generator=g), torch.randn(1, 2000, 4, generator=g)
    sigma = torch.rand(1, 2000, 3, generator=g) * 50 + 1
    R = rotations(1, 2000, g, torch.float32)
    def eikonal_step(autocast):
        """The outputs, the gradient w.r.t. q taken inside the region (its backward used to run in
        fp16 / bf16 there: 2e-3 off), and the second order to p, f, sigma, R outside it."""
        leaves = [t.clone().requires_grad_() for t in (q, p, f, sigma, R)]
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = pointconv.knn_aggregate_aniso(*leaves, 8)
            (gq,) = torch.autograd.grad((out[0] * torch.arange(4.0)).sum(), leaves[0], create_graph=True)
        return (*out, gq, *torch.autograd.grad(((gq.norm(dim=-1) - 1) ** 2).mean(), leaves[1:]))

    for backend in ("torch", "reference"):
        with pointconv.use_backend(backend):
            expect, got = eikonal_step(False), eikonal_step(True)
        for a, b in zip(got, expect):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_feature_dtypes():
    q, p, f, sigma, R = make(Q=20, P=30)
    with pytest.raises(TypeError, match="f is float64 but the coordinates are torch.float32"):
        pointconv.knn_aggregate_aniso(q, p, f.double(), sigma, R, 4)  # (it was rounded to float32)
    for half in (torch.float16, torch.bfloat16):  # every backend returns f's dtype, summed in float32
        outs = []
        for backend in ("torch", "reference"):
            with pointconv.use_backend(backend):
                outs.append(pointconv.knn_aggregate_aniso(q, p, f.to(half), sigma, R, 4)[0])
        assert outs[0].dtype == outs[1].dtype == half
        torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_zero_feature_channels_forward_and_backward(backend):
    q, p, f, sigma, R = make(Q=6, P=9, F=0, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, p, f, sigma, R)]
    with pointconv.use_backend(backend):
        f_out, w, d, _ = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 3)
    assert f_out.shape == (2, 6, 0)
    grads = torch.autograd.grad(f_out.sum() + w.sum(), leaves, allow_unused=True, materialize_grads=True)
    with pointconv.use_backend("reference"):
        ref = torch.autograd.grad(pointconv.knn_aggregate_aniso(*leaves, 3)[1].sum(), leaves, allow_unused=True,
                                  materialize_grads=True)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_clouds_far_from_the_origin():
    q, p, f, sigma, R = make(Q=80, P=70)
    shift = torch.tensor([1000.0, -2000.0, 500.0])
    out = pointconv.knn_aggregate_aniso(q + shift, p + shift, f, sigma, R, 9)
    assert_same(out, knn_aggregate_aniso_reference(q + shift, p + shift, f, sigma, R, 9))


@pytest.mark.parametrize("scale,precision,stretch,dtype", [(1e-20, 1e40, 1.0, torch.float64),
                                                           (1e20, 1e-40, 1.0, torch.float64),
                                                           (1e-25, 1e30, 1e10, torch.float32)])
def test_scales_beyond_float32_select_exactly(scale, precision, stretch, dtype):
    """m = O(1), but the ranking GEMM's terms (sigma |R|^2, squared centered coordinates) overflow
    float32: the GEMM then runs in float64 (float32 inputs too, with R stretched 1e10 and sigma
    1e30, so M = R^T diag(sigma) R is about 1e50)."""
    q, p, f, sigma, R = make(B=1, Q=30, P=40, dtype=dtype, seed=7)
    q, p, sigma, R = q * scale, p * scale, sigma * (precision / 20), R * stretch
    assert_same(pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 6),
                knn_aggregate_aniso_reference(q, p, f, sigma, R, 6))
    assert_same(pointconv.knn_aggregate_iso(q, p, f, sigma[..., :1], 6),
                knn_aggregate_iso_reference(q, p, f, sigma[..., :1], 6))


def test_missing_neighbors_are_padded_not_garbage(device):
    q, p, f, sigma, R = (t.to(device) for t in make(P=6))
    lengths = torch.tensor([6, 0], device=device)
    f_out, w, d, i = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 10, p_lengths=lengths)
    assert bool((i[0, :, 6:] == -1).all()) and bool((i[0, :, :6] >= 0).all())
    assert bool((w[0, :, 6:] == 0).all()) and bool(torch.isinf(d[0, :, 6:]).all())
    assert bool((i[1] == -1).all()) and bool((f_out[1] == 0).all()) and bool((w[1] == 0).all())
    assert_same((f_out, w, d, i), knn_aggregate_aniso_reference(q, p, f, sigma, R, 10, p_lengths=lengths))


def check_overflowing_exponents_count_as_missing(backend, device="cpu"):
    """Points whose exponent overflows float32 (m = inf) count as missing, as padding does: their
    weight exp(-m) is 0 either way; with select="euclidean" only their weight is 0."""
    p = torch.tensor([[[0.0, 0, 0], [10, 0, 0], [20, 0, 0], [1, 0, 0]]], device=device)
    f, R, q = (t.to(device) for t in (torch.ones(1, 4, 1), torch.eye(3).expand(1, 4, 3, 3), torch.zeros(1, 2, 3)))
    sigma = torch.full((1, 4, 3), 1e37, device=device)  # m = 1e37 at distance 1, 1e39 (inf) at 10
    for requires_grad in (False, True):  # (the forward-only kernel and the autograd paths)
        with pointconv.use_backend(backend):
            qq = q.clone().requires_grad_(requires_grad)
            _, w, d, i = pointconv.knn_aggregate_aniso(qq, p, f, sigma, R, 3)
            _, w_e, d_e, i_e = pointconv.knn_aggregate_aniso(qq, p, f, sigma, R, 3, select="euclidean")
        assert i[0].tolist() == [[0, 3, -1]] * 2 and d[0, :, 2].isinf().all() and d[0, :, 1].eq(1e37).all()
        assert w[0].tolist() == [[1.0, 0.0, 0.0]] * 2 and w_e[0].tolist() == [[1.0, 0.0, 0.0]] * 2
        assert i_e[0].tolist() == [[0, 3, 1]] * 2 and d_e[0].tolist() == [[0.0, 1.0, 100.0]] * 2


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_overflowing_exponents_count_as_missing(backend):
    check_overflowing_exponents_count_as_missing(backend)


def check_nan_exponents_count_as_missing(backend, device="cpu"):
    """Finite float32 inputs whose difference q - p overflows give m = NaN (0 * inf in R d): that
    point counts as missing, as an overflowing one does (its float32 key, with the sign bit of
    x86's NaN, ranked it first, ahead of the true nearest point)."""
    P = 8
    q = torch.tensor([[[3e38, 0.0, 0.0]]])
    p = torch.zeros(1, P, 3)
    p[0, :, 0] = q[0, 0, 0] - 2.0 ** 104 * torch.arange(P, dtype=torch.float64).float()  # float32 steps near 3e38
    p[0, 5, 0] = -3e38  # q - p = 6e38: inf in float32
    f, sigma = torch.ones(1, P, 1), torch.ones(1, P, 3)
    R = (1e-20 * torch.eye(3)).expand(1, P, 3, 3).contiguous()  # u = 1e-20 d: finite m elsewhere
    q, p, f, sigma, R = (t.to(device) for t in (q, p, f, sigma, R))
    for K in (3, P):
        with pointconv.use_backend(backend):
            _, w, d, i = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, K)
        want = [0, 1, 2] if K == 3 else [0, 1, 2, 3, 4, 6, 7, -1]
        assert i[0, 0].tolist() == want and torch.isfinite(w).all()
        assert d[0, 0, :7 if K == P else 3].isfinite().all() and (K == 3 or d[0, 0, 7].isinf())


@pytest.mark.parametrize("backend,small_cloud", [("torch", 64), ("torch", 0), ("reference", 64)])
def test_nan_exponents_count_as_missing(backend, small_cloud, monkeypatch):
    monkeypatch.setattr(select_module, "_SMALL_CLOUD", small_cloud)  # 0: the GEMM path
    check_nan_exponents_count_as_missing(backend)


def test_iso_matches_reference_and_scalar_formula():
    q, p, f, sigma, _ = make()
    s1 = sigma[..., :1].contiguous()
    out = pointconv.knn_aggregate_iso(q, p, f, s1, 7)
    assert_same(out, knn_aggregate_iso_reference(q, p, f, s1, 7))
    d2 = ((q[:, :, None] - p[:, None]) ** 2).sum(-1)
    m = torch.gather(s1[..., 0][:, None].expand_as(d2) * d2, 2, out[3])
    torch.testing.assert_close(out[2], m)
    torch.testing.assert_close(out[1], torch.exp(-m))


@pytest.mark.parametrize("select", ["aniso", "euclidean"])
def test_gradcheck_every_input_and_output(select):
    q, p, f, sigma, R = make(B=1, Q=4, P=6, F=2, dtype=torch.float64, seed=3, rot=False)
    inputs = [t.clone().requires_grad_() for t in (q, p, f, sigma, R)]
    # K = 7 > P = 6: a padded slot too. Padded dists are inf: compare the finite ones.
    def fn(q, p, f, sigma, R):
        f_out, w, d, _ = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 7, select=select)
        return f_out, w, d[..., :6]
    torch.autograd.gradcheck(fn, inputs)
    torch.autograd.gradgradcheck(fn, inputs)


def _sdf_losses(agg, mlp, q, p, f, sigma, R):
    f_out, w, d, _ = agg(q, p, f, sigma, R, 5)
    feat = f_out / (w.sum(-1, keepdim=True) + 1e-6)
    sdf = mlp(feat).squeeze(-1)
    (g,) = torch.autograd.grad(sdf.sum(), q, create_graph=True)
    return ((g.norm(dim=-1) - 1) ** 2).mean() + sdf.abs().mean() + 1e-3 * d[torch.isfinite(d)].mean()


def test_eikonal_training_step_matches_reference():
    q, p, f, sigma, R = make(B=1, Q=30, P=25, F=6, dtype=torch.float64, seed=4)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1)).double()
    grads = []
    for agg in (pointconv.knn_aggregate_aniso, knn_aggregate_aniso_reference):
        leaves = [t.clone().requires_grad_() for t in (q, p, f, sigma, R)]
        mlp.zero_grad()
        loss = _sdf_losses(agg, mlp, *leaves)
        loss.backward()
        grads.append([t.grad for t in leaves[1:]] + [prm.grad.clone() for prm in mlp.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert bool((a != 0).any())


def test_deterministic_mode_is_bitwise_reproducible(deterministic_mode):
    q, p, f, sigma, R = make(Q=300, P=200, F=16)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, p, f, sigma, R)]
        f_out, w, d, i = pointconv.knn_aggregate_aniso(*leaves, 8)
        (f_out.square().sum() + w.sum()).backward()
        runs.append([f_out, w, d, i] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cpu_gradients_are_bitwise_repeatable_without_deterministic_mode():
    # the first and the Eikonal second order: no accumulation may depend on the thread schedule
    q, p, f, sigma, R = make(B=1, Q=4000, P=3000, F=16, seed=3)
    runs = []
    for _ in range(4):
        leaves = [t.clone().requires_grad_() for t in (q, p, f, sigma, R)]
        f_out, w, d, i = pointconv.knn_aggregate_aniso(*leaves, 8)
        (g,) = torch.autograd.grad(f_out.sum(), leaves[0], create_graph=True)
        loss = f_out.square().sum() + w.sum() + g.square().sum()
        runs.append(list(torch.autograd.grad(loss, leaves)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_reference_backend_forced():
    q, p, f, sigma, R = make()
    with pointconv.use_backend("reference"):
        a = pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 6)
    assert_same(pointconv.knn_aggregate_aniso(q, p, f, sigma, R, 6), a)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(q=a["q"][..., :2]), ValueError, "q must have D = 3"),
    (lambda a: a.update(p=a["p"][:1]), ValueError, "batch size"),
    (lambda a: a.update(f=a["f"][:, :3]), ValueError, r"f must have shape \(2, 40, F\)"),
    (lambda a: a.update(f=a["f"].long()), TypeError, "f must be a floating-point"),
    (lambda a: a.update(sigma=-a["sigma"]), ValueError, "sigma must be finite and > 0"),
    (lambda a: a.update(sigma=a["sigma"][..., :1]), ValueError, r"sigma must have shape \(2, 40, 3\)"),
    (lambda a: a.update(sigma=a["sigma"].double()), TypeError, "sigma must have the dtype of p"),
    (lambda a: a.update(R=a["R"][..., :2]), ValueError, r"R must have shape"),
    (lambda a: a.update(R=a["R"] * float("nan")), ValueError, "R contains NaN"),
    (lambda a: a.update(K=0), ValueError, "K must be >= 1"),
    (lambda a: a.update(select="mahalanobis"), ValueError, "select must be one of"),
    (lambda a: a.update(p_lengths=torch.tensor([50, 1])), ValueError, r"p_lengths must lie in \[0, 40\]"),
    (lambda a: a.update(K=2**40), ValueError, "K asks for an output"),
])
def test_bad_input(mutate, exc, match):
    q, p, f, sigma, R = make()
    args = dict(q=q, p=p, f=f, sigma=sigma, R=R, K=4, p_lengths=None, select="aniso")
    mutate(args)
    with pytest.raises(exc, match=match):
        pointconv.knn_aggregate_aniso(args["q"], args["p"], args["f"], args["sigma"], args["R"], args["K"],
                                      p_lengths=args["p_lengths"], select=args["select"])
