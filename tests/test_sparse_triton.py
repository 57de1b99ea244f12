"""The sparse convolution's Triton path (implicit GEMM, ``pointconv.sparse._implicit_gemm``) against
the torch ops of ``pointconv.sparse.conv``: on CUDA when there is one, else in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py) at small sizes."""
import pytest
import torch

import pointconv
import pointconv.sparse as spconv
from pointconv.sparse import _implicit_gemm
from test_sparse_conv import random_sparse
from needs_triton import require_triton

require_triton()
DEV = "cuda" if torch.cuda.is_available() else "cpu"

LAYERS = {
    "subm": lambda c, o: spconv.SubMConv3d(c, o, 3, indice_key="k"),
    "strided": lambda c, o: spconv.SparseConv3d(c, o, 3, stride=2, padding=1),
    "transposed": lambda c, o: spconv.SparseConvTranspose3d(c, o, 2, stride=2),
    "subm2d_dilated": lambda c, o: spconv.SubMConv2d(c, o, 3, dilation=2),
}


def _input(kind, channels, dtype, seed=1):
    x = random_sparse(2 if kind.startswith("subm2d") else 3, 2, channels, density=0.35, seed=seed, dtype=dtype)
    f = x.features.to(DEV).requires_grad_()
    return spconv.SparseConvTensor(f, x.indices.to(DEV), x.spatial_shape, x.batch_size), f


def _run(layer, x, f, backend):
    """Output features and the gradients of a loss w.r.t. the features and the weight."""
    with pointconv.use_backend(backend):
        y = layer(x)
        gf, gw = torch.autograd.grad((y.features ** 2).sum(), (f, layer.weight))
    return y.features, gf, gw


@pytest.mark.parametrize("kind", list(LAYERS))
def test_implicit_gemm_matches_the_torch_ops(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind](5, 7).to(DEV)
    x, f = _input(kind, 5, torch.float32)
    got = _run(layer, x, f, "triton")
    want = _run(layer, x, f, "torch")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_inverse_conv_on_the_triton_path():
    torch.manual_seed(1)
    down = spconv.SparseConv3d(4, 6, 3, stride=2, indice_key="d").to(DEV)
    up = spconv.SparseInverseConv3d(6, 3, 3, indice_key="d").to(DEV)
    x, f = _input("strided", 4, torch.float32, seed=2)

    def run(backend):
        with pointconv.use_backend(backend):
            y = up(down(x))
            return (y.features, *torch.autograd.grad(y.features.sum(), (f, down.weight, up.weight)))

    for g, w in zip(run("triton"), run("torch")):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["subm", "strided"])
def test_gradients_to_second_order_on_the_triton_path(kind):
    # seven sites of a 4 x 4 grid (the interpreter runs every program in NumPy: keep it tiny)
    idx = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 2, 0], [0, 2, 3], [0, 3, 2], [0, 3, 3]],
                       dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(7, 2, dtype=torch.float64, generator=g).to(DEV).requires_grad_()
    w = torch.randn(9, 2, 2, dtype=torch.float64, generator=g).to(DEV).requires_grad_()  # (offsets, C_in, C_out)
    layer = {"subm": spconv.SubMConv2d(2, 2, 3), "strided": spconv.SparseConv2d(2, 2, 3, stride=2)}[kind]
    tables = layer._kernel_map(spconv.SparseConvTensor(feats, idx, [4, 4], 1)).tables()

    def conv(f, w):
        with pointconv.use_backend("triton"):
            return _implicit_gemm.implicit_gemm_conv(f, w, tables)

    torch.autograd.gradcheck(conv, (feats, w))
    torch.autograd.gradgradcheck(conv, (feats, w))


def test_weight_gradient_in_many_chunks_summed_in_order(monkeypatch):
    # tiny chunks: several per kernel offset, each offset's partial sums added in chunk order
    monkeypatch.setattr(_implicit_gemm, "_PAIR_BLOCK", 2)
    monkeypatch.setattr(_implicit_gemm, "_TARGET_CHUNKS", 5)
    torch.manual_seed(3)
    layer = LAYERS["subm"](5, 7).to(DEV)
    x, f = _input("subm", 5, torch.float32, seed=4)
    got = _run(layer, x, f, "triton")
    tables = layer._kernel_map(x).tables()
    assert tables.chunk_table.shape[1] > 1
    want = _run(layer, x, f, "torch")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_chunks_cover_each_offset_once():
    start = [0, 0, 70, 71, 200]
    lo, hi, flat = _implicit_gemm._chunks(start)
    width = len(flat) // (len(start) - 1)
    assert width * (len(start) - 1) == len(flat)
    for o, (a, b) in enumerate(zip(start[:-1], start[1:])):
        ids = [c for c in flat[o * width:(o + 1) * width] if c >= 0]
        covered = [t for c in ids for t in range(int(lo[c]), int(hi[c]))]
        assert covered == list(range(a, b))  # in order, no gap, no overlap


def test_tables_are_built_once_per_kernel_map_and_read_both_ways():
    x, _ = _input("subm", 3, torch.float32)
    layer = LAYERS["subm"](3, 3).to(DEV)
    kmap = layer(x).find_indice_pair("k")
    T = kmap.tables()
    assert T._transposed is None  # a forward alone does not build the input side's table
    assert T is kmap.tables() and T.transposed.transposed is T
    o = torch.repeat_interleave(torch.arange(len(kmap.start) - 1, device=DEV),
                                torch.tensor(kmap.start).diff().to(DEV))
    assert torch.equal(_by_row(T)[o, kmap.out_rows].long(), kmap.in_rows)
    assert torch.equal(_by_row(T.transposed)[o, kmap.in_rows].long(), kmap.out_rows)
    assert int((T.gather >= 0).sum()) == kmap.in_rows.numel()  # nothing else in the table


def _by_row(T):
    """``T.gather`` with its columns back in output-row order."""
    assert torch.equal(T.rows.sort().values, torch.arange(T.rows.numel(), device=T.rows.device, dtype=T.rows.dtype))
    table = torch.empty_like(T.gather)
    table[:, T.rows.long()] = T.gather
    return table


def _offset_bits(table):
    """Per column, whether each offset feeds it, the rarest offset first (ties: the lower offset)."""
    hit = (table >= 0).cpu()
    return hit[torch.argsort(hit.sum(1), stable=True)].T.tolist()


@pytest.mark.parametrize("kernel", [3, 5])  # 27 offsets: one sort key; 125: three
def test_table_columns_are_grouped_by_their_offsets_and_give_the_same_convolution(kernel, monkeypatch):
    x, f = _input("subm", 4, torch.float32, seed=8)
    layer = spconv.SubMConv3d(4, 3, kernel, indice_key="k").to(DEV)
    with pointconv.use_backend("triton"):
        y = layer(x)
    T = y.find_indice_pair("k").tables()
    for table in (T.gather, T.transposed.gather):
        bits = _offset_bits(table)
        assert bits == sorted(bits) and len(set(map(tuple, bits))) > 1  # grouped, not all alike
    monkeypatch.setattr(_implicit_gemm, "_SORT_COLUMNS", False)
    unsorted = layer.__class__(4, 3, kernel, indice_key="k").to(DEV)
    unsorted.load_state_dict(layer.state_dict())
    with pointconv.use_backend("triton"):
        z = unsorted(x)
        (gz,) = torch.autograd.grad(z.features.pow(2).sum(), f)
        (gy,) = torch.autograd.grad(layer(x).features.pow(2).sum(), f)
    T0 = z.find_indice_pair("k").tables()
    assert torch.equal(T0.rows, torch.arange(len(T0.rows), dtype=torch.int32, device=DEV))
    assert torch.equal(_by_row(T), T0.gather) and torch.equal(_by_row(T.transposed), T0.transposed.gather)
    assert torch.equal(y.features, z.features) and torch.equal(gy, gz)  # each row: the same sums in the same order


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEV == "cpu", reason="Triton's interpreter computes bfloat16 dots wrong; compiled on sm_90 by compile_kernels"))])
def test_half_features_accumulate_in_float32(dtype):
    torch.manual_seed(4)
    layer = LAYERS["subm"](6, 5).to(DEV)
    x, f = _input("subm", 6, torch.float32, seed=5)
    with pointconv.use_backend("triton"):
        full = layer(x).features
        half = layer(x.replace_feature(f.to(dtype))).features
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full, rtol=2e-2, atol=2e-2)


def test_repeated_runs_are_bitwise_identical():
    torch.manual_seed(5)
    layer = LAYERS["strided"](5, 7).to(DEV)
    x, f = _input("strided", 5, torch.float32, seed=6)
    a = _run(layer, x, f, "triton")
    b = _run(layer, x, f, "triton")
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_empty_input_on_the_triton_path():
    layer = LAYERS["subm"](3, 4).to(DEV)
    f = torch.zeros((0, 3), device=DEV, requires_grad=True)
    x = spconv.SparseConvTensor(f, torch.zeros((0, 4), dtype=torch.int32, device=DEV), [5, 5, 5], 1)
    with pointconv.use_backend("triton"):
        y = layer(x)
        (gw,) = torch.autograd.grad(y.features.sum(), layer.weight)
    assert y.features.shape == (0, 4)
    assert torch.equal(gw, torch.zeros_like(gw))


def test_too_many_rows_for_the_kernels():
    empty = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(ValueError, match="int32 rows"):
        _implicit_gemm.conv_tables(empty, empty, [0, 0], 1 << 31, 1)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs a CUDA device with 40 GB (N * C past 2^31 elements)")
def test_rows_times_channels_past_int32_on_cuda():
    # a line of 2^23 + 8 sites with 256 channels: feature offsets row * C pass 2^31
    n, c = (1 << 23) + 8, 256
    idx = torch.zeros((n, 2), dtype=torch.int32, device="cuda")
    idx[:, 1] = torch.arange(n, device="cuda", dtype=torch.int32)
    g = torch.Generator(device="cuda").manual_seed(0)
    f = torch.randn((n, c), device="cuda", dtype=torch.float16, generator=g)
    x = spconv.SparseConvTensor(f, idx, [n], 1)
    layer = spconv.SubMConv1d(c, 8, 3, bias=False).to("cuda").half()
    out = layer(x).features
    tail = f[-9:].float()  # the last 8 rows, each with its left and right neighbours where they exist
    w = layer.weight.float()  # (out, 3, in)
    want = tail[1:] @ w[:, 1].t() + tail[:-1] @ w[:, 0].t()
    want[:-1] += tail[2:] @ w[:, 2].t()
    torch.testing.assert_close(out[-8:].float(), want, rtol=2e-2, atol=5e-2)


def test_tf32_products_follow_torchs_matmul_setting():
    from pointconv.kernels.sparse_conv import _precision

    assert _precision(torch.float32) == "ieee" and _precision(torch.float64) == "ieee"
    torch.set_float32_matmul_precision("high")
    try:
        assert _precision(torch.float32) == "tf32" and _precision(torch.float64) == "ieee"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert _precision(torch.float32) == "ieee"


def test_a_tensor_with_triton_tables_pickles_and_deep_copies(tmp_path):
    import copy
    x, f = _input("subm", 3, torch.float32, seed=9)
    layer = LAYERS["subm"](3, 2).to(DEV)
    with pointconv.use_backend("triton"):
        y = layer(x)
    assert y.find_indice_pair("k")._tables._transposed is None  # (no backward yet)
    torch.save(y, tmp_path / "y.pt")
    # (torch deep-copies only leaf tensors: the copy is of the output's detached features)
    for z in (torch.load(tmp_path / "y.pt", weights_only=False), copy.deepcopy(y.replace_feature(y.features.detach()))):
        T, T0 = z.find_indice_pair("k").tables(), y.find_indice_pair("k").tables()
        assert torch.equal(T.gather, T0.gather) and T.transposed.transposed is T
        assert torch.equal(T.transposed.gather, T0.transposed.gather)
        nxt = LAYERS["subm"](2, 2).to(DEV)  # reuses the map under indice_key "k"
        with pointconv.use_backend("triton"):
            torch.testing.assert_close(nxt(z).features, nxt(y).features)
