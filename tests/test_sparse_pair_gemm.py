"""The CPU path of sparse convolution (tiled pair products, ``pointconv.sparse._pair_gemm``) against
the per-offset torch ops of the reference backend, in float64, with tiles of a few rows."""
import pytest
import torch

import pointconv
import pointconv.sparse as spconv
from pointconv.sparse import _pair_gemm
from pointconv.sparse.conv import apply_kernel_map
from pointconv.sparse.kernel_map import build_conv, build_subm, build_transposed, inverse_of
from test_sparse_conv import random_sparse

MAPS = {
    "subm": lambda x: build_subm(x.indices, x.spatial_shape, (3, 3, 3), (1, 1, 1)),
    "subm dilated, mixed sizes": lambda x: build_subm(x.indices, x.spatial_shape, (3, 1, 5), (2, 1, 1)),
    "subm even": lambda x: build_subm(x.indices, x.spatial_shape, (2, 3, 2), (1, 1, 2)),
    "strided": lambda x: build_conv(x.indices, x.spatial_shape, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    "transposed": lambda x: build_transposed(x.indices, x.spatial_shape, (2, 2, 2), (2, 2, 2), (0, 0, 0),
                                             (1, 1, 1), (0, 0, 0)),
    "inverse": lambda x: inverse_of(build_conv(x.indices, x.spatial_shape, (3, 3, 3), (2, 2, 2), (1, 1, 1),
                                               (1, 1, 1))),
}


def _forward_and_grads(features, weight, kmap, backend):
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    with pointconv.use_backend(backend):
        y = apply_kernel_map(f, w, kmap)
        gf, gw = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), (f, w))
    return y, gf, gw


def _sorted_sites(x):
    """``x`` with its sites in ascending (batch, coordinates) order."""
    key = x.indices.long() @ torch.tensor([4096 ** 3, 4096 ** 2, 4096, 1])
    order = torch.argsort(key)
    return spconv.SparseConvTensor(x.features[order], x.indices[order], x.spatial_shape, x.batch_size)


@pytest.mark.parametrize("order", ["random", "sorted"])
@pytest.mark.parametrize("kind", list(MAPS))
def test_tiled_products_equal_the_torch_ops(kind, order, monkeypatch):
    """Tiles of two output rows; sites in random order leave some offsets' pairs unsorted (cut
    into equal pieces), sorted sites sort them all (cut at the tiles)."""
    monkeypatch.setattr(_pair_gemm, "_TILE_ELEMENTS", 7)  # tiles of two rows at 3 channels
    x = random_sparse(3, 2, 3, density=0.4, seed=7)
    x = _sorted_sites(x) if order == "sorted" else x
    kmap = MAPS[kind](x)
    features = x.features if kind != "inverse" else torch.randn(kmap.in_indices.shape[0], 3, dtype=torch.float64)
    weight = torch.randn(4, *kmap.kernel_size, 3, dtype=torch.float64)
    got = _forward_and_grads(features, weight, kmap, "torch")
    want = _forward_and_grads(features, weight, kmap, "reference")
    assert kmap.in_rows.numel() > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_pieces_of_sorted_sites_follow_the_output_tiles(monkeypatch):
    """With sorted sites every offset's pairs ascend by output row, so each tile's pieces write
    only into that tile (the output stays in cache, and tiles can run on separate threads); in
    random order some offsets do not, and their pairs come as loose pieces after the tiles."""
    monkeypatch.setattr(_pair_gemm, "_TILE_ELEMENTS", 12)  # tiles of 4 rows at 3 channels
    x = random_sparse(3, 2, 3, density=0.4, seed=7)
    for sites, expect_sorted in ((x, False), (_sorted_sites(x), True)):
        tables = MAPS["subm"](sites).pair_tables()
        assert all(tables._sorted) == expect_sorted
        tiles, loose = tables._tiles(3)
        assert bool(loose) != expect_sorted
        covered = torch.zeros(tables.out_rows.numel(), dtype=torch.int64)
        assert [(r0, r1) for r0, r1, _ in tiles] == [(r, min(r + 4, tables.n_out)) for r in range(0, tables.n_out, 4)]
        for r0, r1, pieces in tiles:
            for o, a, b in pieces:
                assert tables.start[o] <= a < b <= tables.start[o + 1] and o != tables.identity and tables._sorted[o]
                assert bool(((tables.out_rows[a:b] >= r0) & (tables.out_rows[a:b] < r1)).all())
                covered[a:b] += 1
        for o, a, b in loose:
            assert tables.start[o] <= a < b <= tables.start[o + 1] and b - a <= 4 and not tables._sorted[o]
            covered[a:b] += 1
        center = slice(tables.start[tables.identity], tables.start[tables.identity + 1])
        assert covered[center].eq(0).all()
        covered[center] = 1
        assert covered.eq(1).all()  # every pair in exactly one piece


@pytest.mark.parametrize("order", ["random", "sorted"])
def test_the_same_bits_on_one_thread_and_on_several(order, monkeypatch):
    """The tiles and the weight gradient's offsets run on the threads; each output row and each
    offset sums its terms in a fixed order, so the thread count does not change a bit."""
    monkeypatch.setattr(_pair_gemm, "_TILE_ELEMENTS", 40)  # tiles of 5 rows at 8 channels
    monkeypatch.setattr(_pair_gemm, "_THREADS_MIN_ELEMENTS", 0)  # threads even for these few pairs
    x = random_sparse(3, 2, 8, density=0.5, seed=10, dtype=torch.float32)
    x = _sorted_sites(x) if order == "sorted" else x
    kmap = MAPS["subm"](x)
    weight = torch.randn(8, 3, 3, 3, 8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_forward_and_grads(x.features, weight, kmap, "torch"))
    finally:
        torch.set_num_threads(threads)
    for one, several in zip(*results):
        assert torch.equal(one, several)
    want = _forward_and_grads(x.features.double(), weight.double(), kmap, "reference")
    for got, ref in zip(results[0], want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["subm", "strided"])
def test_tiled_products_are_exact_to_second_order(kind, monkeypatch):
    monkeypatch.setattr(_pair_gemm, "_TILE_ELEMENTS", 8)  # tiles of 4 rows at 2 channels
    x = random_sparse(3, 1, 2, density=0.15, seed=8)
    kmap = MAPS[kind](x)
    weight = torch.randn(2, 3, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    features = x.features.clone().requires_grad_()
    fn = lambda f, w: apply_kernel_map(f, w, kmap)  # noqa: E731
    torch.autograd.gradcheck(fn, (features, weight))
    torch.autograd.gradgradcheck(fn, (features, weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_half_precision_products_are_summed_in_float32(dtype, backend):
    """Binary features, small multiples of 1/4 as weights and multiples of 64 at the center: every
    product is exact in ``dtype`` (whatever the GEMM), their float32 sums are exact, and the result
    rounds once. Summing in ``dtype`` instead drops the quarters next to the center's large terms."""
    g = torch.Generator().manual_seed(9)
    x = random_sparse(3, 2, 16, density=0.5, seed=9, dtype=torch.float32)
    kmap = MAPS["subm"](x)
    f = (torch.rand(x.features.shape, generator=g) < 0.5).to(dtype)
    w = torch.randint(-4, 5, (8, 3, 3, 3, 16), generator=g) / 4
    w[:, 1, 1, 1] = torch.randint(0, 3, (8, 16), generator=g) * 64.0
    w = w.to(dtype)
    with pointconv.use_backend(backend):
        got = apply_kernel_map(f, w, kmap)
    W = w.reshape(8, 27, 16).double()
    want = torch.zeros(f.shape[0], 8, dtype=torch.float64)
    for o in range(27):
        a, b = kmap.start[o], kmap.start[o + 1]
        want.index_add_(0, kmap.out_rows[a:b], f[kmap.in_rows[a:b]].double() @ W[:, o].t())
    assert got.dtype == dtype
    assert bool((want != want.to(dtype).double()).any())  # some sums are not exact in dtype
    assert torch.equal(got, want.to(dtype))


def test_empty_input_and_no_pairs():
    empty = spconv.SparseConvTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32), [5, 5, 5], 1)
    kmap = MAPS["subm"](empty)
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    y = apply_kernel_map(empty.features, w, kmap)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    lone = spconv.SparseConvTensor(torch.ones(1, 3), torch.zeros(1, 4, dtype=torch.int32), [5, 5, 5], 1)
    y = apply_kernel_map(lone.features, w, MAPS["subm"](lone))  # only the center pair
    torch.testing.assert_close(y, lone.features @ w[:, 1, 1, 1].t())


@pytest.mark.parametrize("groups", [1, 2])
def test_no_pairs_give_zero_gradients(groups):
    # no input sites, or sites that no strided output reads: zero gradients, not missing ones (the
    # grouped path's result had no edge to the features or weights)
    for feats, idx in ((torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int32)),
                       (torch.ones(2, 2), torch.tensor([[0, 1], [0, 4]], dtype=torch.int32))):
        f = feats.clone().requires_grad_()
        layer = spconv.SparseConv1d(2, 2, 1, 3, groups=groups)
        y = layer(spconv.SparseConvTensor(f, idx, [6], 1))
        assert y.features.shape == (0, 2)
        gf, gw = torch.autograd.grad(y.features.sum(), (f, layer.weight))
        assert torch.equal(gf, torch.zeros_like(f)) and torch.equal(gw, torch.zeros_like(layer.weight))
