"""SiteIndex: rows of sites by key, and the reuse of released dense tables on CPU."""
import math

import pytest
import torch

from pointconv.sparse import kernel_map
from pointconv.sparse.kernel_map import SiteIndex, linearize


def sites(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(shape[0] * shape[1] * shape[2], generator=g)[:n]
    coords = torch.stack([keys // (shape[1] * shape[2]), keys // shape[2] % shape[1], keys % shape[2]], 1)
    return torch.cat([torch.zeros(n, 1, dtype=torch.int64), coords], 1).int()


def every_cell(shape):
    return torch.arange(shape[0] * shape[1] * shape[2])


def expected_rows(indices, shape):
    rows = torch.full((shape[0] * shape[1] * shape[2],), -1)
    rows[linearize(indices[:, 0], indices[:, 1:], shape)] = torch.arange(indices.shape[0])
    return rows


@pytest.fixture(autouse=True)
def no_spare_table():
    kernel_map._spare_tables.clear()
    yield
    kernel_map._spare_tables.clear()


def test_a_released_table_is_cleared_and_reused():
    shape = [6, 5, 7]
    first, second = sites(80, shape, 0), sites(50, shape, 1)
    with SiteIndex(first, shape, 1) as index:
        assert torch.equal(index.lookup(every_cell(shape)).long(), expected_rows(first, shape))
        storage = index.table.data_ptr()
    assert kernel_map._spare_tables and kernel_map._spare_tables[0].data_ptr() == storage
    with SiteIndex(second, shape, 1) as index:
        assert index.table.data_ptr() == storage  # the spare, not a new table
        # no entry of the first sites is left over
        assert torch.equal(index.lookup(every_cell(shape)).long(), expected_rows(second, shape))


def test_a_smaller_grid_reuses_a_larger_spare_and_the_larger_is_kept():
    big, small = [8, 8, 8], [3, 4, 5]
    with SiteIndex(sites(100, big, 2), big, 1):
        pass
    spare = kernel_map._spare_tables[0]
    few = sites(20, small, 3)
    with SiteIndex(few, small, 1) as index:
        assert index.table.data_ptr() == spare.data_ptr() and index.table.numel() == 60
        assert torch.equal(index.lookup(every_cell(small)).long(), expected_rows(few, small))
    assert kernel_map._spare_tables[0] is spare and bool((spare == -1).all())


def test_a_released_index_refuses_lookups_and_a_failed_one_keeps_no_table():
    shape = [4, 4, 4]
    index = SiteIndex(sites(10, shape, 4), shape, 1)
    index.release()
    index.release()  # twice is harmless
    with pytest.raises(RuntimeError, match="released"):
        index.lookup(every_cell(shape))
    spare = kernel_map._spare_tables.pop()
    kernel_map._spare_tables.append(spare)
    duplicated = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2], [0, 1, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="duplicate"):
        SiteIndex(duplicated, shape, 1)
    assert not kernel_map._spare_tables  # the failed index took the spare and dropped it
    clean = sites(12, shape, 5)
    with SiteIndex(clean, shape, 1) as index:
        assert torch.equal(index.lookup(every_cell(shape)).long(), expected_rows(clean, shape))


def test_kernel_maps_in_a_row_are_exact_with_reused_tables():
    """Submanifold and strided maps built one after another (each reusing the table the previous
    one released) equal maps built with fresh tables."""
    shape = [9, 9, 9]
    inputs = [sites(n, shape, seed) for n, seed in ((200, 6), (40, 7), (300, 8))]
    maps = []
    for idx in inputs:
        maps.append(kernel_map.build_subm(idx, shape, (3, 3, 3), (1, 1, 1)))
        maps.append(kernel_map.build_conv(idx, shape, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)))
    for i, idx in enumerate(inputs):
        kernel_map._spare_tables.clear()
        fresh = kernel_map.build_subm(idx, shape, (3, 3, 3), (1, 1, 1))
        assert torch.equal(fresh.in_rows, maps[2 * i].in_rows) and torch.equal(fresh.out_rows, maps[2 * i].out_rows)
        assert fresh.start == maps[2 * i].start


def _literal_pairs(indices, kernel_size, stride, padding, dilation, out_shape, transposed):
    """Per offset (row-major), the (input row, output site) pairs by the definition, site by site."""
    import itertools

    pairs = []
    for o, tap in enumerate(itertools.product(*[range(k) for k in kernel_size])):
        for row, (b, *x) in enumerate(indices.tolist()):
            y = []
            for xa, t, s, p, d in zip(x, tap, stride, padding, dilation):
                if transposed:
                    y.append(xa * s - p + t * d)
                elif (xa + p - t * d) % s == 0:
                    y.append((xa + p - t * d) // s)
                else:
                    break
            if len(y) == len(x) and all(0 <= ya < n for ya, n in zip(y, out_shape)):
                pairs.append((o, row, (b, *y)))
    return sorted(pairs)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("ndim,kernel_size,stride,padding,dilation", [
    (1, (3,), (2,), (1,), (1,)),
    (2, (3, 2), (2, 1), (1, 0), (1, 2)),
    (3, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    (3, (2, 3, 1), (3, 1, 2), (0, 2, 0), (2, 1, 1)),
    (4, (2, 1, 3, 2), (1, 2, 2, 1), (1, 0, 1, 0), (1, 1, 2, 1)),
])
def test_strided_and_transposed_maps_pair_exactly_the_literal_definition(ndim, kernel_size, stride, padding,
                                                                       dilation, transposed):
    # each output site's key is a sum of one term per axis (kernel_map._target_keys): checked here
    # against the per-site, per-offset definition on ragged two-sample batches
    g = torch.Generator().manual_seed(ndim)
    shape = [7, 5, 6, 4][:ndim]
    cells = torch.randperm(2 * math.prod(shape), generator=g)[:60]
    coords = [cells // math.prod(shape)]
    for a in range(ndim):
        coords.append(cells // math.prod(shape[a + 1:]) % shape[a])
    indices = torch.stack(coords, 1).int()
    if transposed:
        kmap = kernel_map.build_transposed(indices, shape, kernel_size, stride, padding, dilation, (0,) * ndim)
    else:
        kmap = kernel_map.build_conv(indices, shape, kernel_size, stride, padding, dilation)
    out_sites = kmap.out_indices.tolist()
    got = sorted((o, int(i), tuple(out_sites[int(r)]))
                 for o in range(len(kmap.start) - 1)
                 for i, r in zip(kmap.in_rows[kmap.start[o]:kmap.start[o + 1]], kmap.out_rows[kmap.start[o]:kmap.start[o + 1]]))
    assert got == _literal_pairs(indices, kernel_size, stride, padding, dilation, kmap.out_spatial_shape, transposed)
    assert out_sites == [list(s) for s in sorted(set(map(tuple, out_sites)))]  # distinct, in key order
