"""Kernel maps built the accelerators' way (all offsets compacted in one pass after one read of the
device, ``kernel_map._compacts_in_one_pass``), run here on CPU: the same pairs as the CPU build,
the same errors, its gather tables equal to the ones scattered from the pairs, and the number of
device reads each build makes (each one stalls a CUDA stream)."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pointconv.sparse as spconv
from pointconv import _device_transfers
from pointconv.sparse import _implicit_gemm, kernel_map

BIG = [80, 1600, 1600]  # more cells than a dense site table takes: sorted keys and searchsorted


@pytest.fixture
def one_pass(monkeypatch):
    monkeypatch.setattr(kernel_map, "_compacts_in_one_pass", lambda device: True)


def random_sites(shape, n, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if math.prod(shape) * batch > 1 << 24:  # a dense grid of candidates would not fit: a small cube
        lo = [s // 2 - 6 for s in shape]
        cube = random_sites([12] * len(shape), n, batch, seed)
        return cube + torch.tensor([0] + lo, dtype=torch.int32)
    cells = torch.randperm(batch * math.prod(shape), generator=g)[:n]
    coords = [cells // math.prod(shape)] + [cells // math.prod(shape[a + 1:]) % shape[a] for a in range(len(shape))]
    return torch.stack(coords, 1).int()


def pairs_by_offset(kmap):
    """Per offset, the sorted (input row, output row) pairs."""
    return [sorted(zip(kmap.in_rows[a:b].tolist(), kmap.out_rows[a:b].tolist()))
            for a, b in zip(kmap.start[:-1], kmap.start[1:])]


BUILDS = {
    "subm 3^3": lambda i, s: kernel_map.build_subm(i, s, (3, 3, 3), (1, 1, 1)),
    "subm 5x1x3 dilated": lambda i, s: kernel_map.build_subm(i, s, (5, 1, 3), (1, 2, 2)),
    "subm even": lambda i, s: kernel_map.build_subm(i, s, (2, 3, 2), (1, 1, 2)),
    "strided": lambda i, s: kernel_map.build_conv(i, s, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    "strided 2x3x1": lambda i, s: kernel_map.build_conv(i, s, (2, 3, 1), (3, 1, 2), (0, 2, 0), (2, 1, 1)),
    "transposed": lambda i, s: kernel_map.build_transposed(i, s, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1),
                                                           (0, 0, 0)),
}


@pytest.mark.parametrize("shape", [[9, 7, 8], BIG], ids=["dense table", "sorted keys"])
@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("n", [0, 1, 150])
def test_one_pass_maps_pair_the_same_sites_as_the_cpu_build(build, shape, n, monkeypatch):
    indices = random_sites(shape, n)
    want = BUILDS[build](indices, shape)
    monkeypatch.setattr(kernel_map, "_compacts_in_one_pass", lambda device: True)
    got = BUILDS[build](indices, shape)
    assert got.start == want.start
    assert torch.equal(got.out_indices, want.out_indices)
    assert pairs_by_offset(got) == pairs_by_offset(want)
    assert got.in_rows.dtype == got.out_rows.dtype == torch.int64
    if n == 150:  # pairs were found (a submanifold map's beyond each site's own)
        assert got.in_rows.numel() > (n if got.subm else 0)


@pytest.mark.parametrize("build", [b for b in BUILDS if b.startswith("subm")])
def test_a_one_pass_submanifold_lookup_is_the_kernels_gather_table(build, one_pass):
    shape = [9, 7, 8]
    kmap = BUILDS[build](random_sites(shape, 150, seed=3), shape)
    n = kmap.in_indices.shape[0]
    T = kmap.tables()  # from the lookup (and, for odd kernels, its flip)
    scattered = _implicit_gemm.conv_tables(kmap.in_rows, kmap.out_rows, kmap.start, n, n)
    assert torch.equal(T.gather, scattered.gather)
    assert torch.equal(T.transposed.gather, scattered.transposed.gather)
    assert T.gather.dtype == T.transposed.gather.dtype == torch.int32
    for name in ("rows", "in_rows", "out_rows", "chunk_start", "chunk_end", "chunk_table"):
        assert torch.equal(getattr(T, name), getattr(scattered, name))


@pytest.mark.parametrize("shape", [[9, 7, 8], BIG], ids=["dense table", "sorted keys"])
@pytest.mark.parametrize("build", list(BUILDS))
def test_one_pass_builds_refuse_duplicate_sites(build, shape, one_pass):
    indices = random_sites(shape, 40, seed=5)
    indices = torch.cat([indices, indices[17:18]])
    with pytest.raises(ValueError, match="duplicate sites"):
        BUILDS[build](indices, shape)


class SyncingOps(TorchDispatchMode):
    """Records the ops that wait for a CUDA device to learn a value or a size."""

    # (torch.linalg.eigh and eigvalsh synchronize a CUDA device too: they check the solver's status)
    SYNCING = ("nonzero.", "_local_scalar_dense", "equal.", "is_nonzero", "unique", "masked_select", "_linalg_eigh")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(s in name for s in self.SYNCING) or (name.startswith("aten.repeat_interleave")
                                                    and (kwargs or {}).get("output_size") is None):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    reads = []
    real = _device_transfers.host_ints

    def counted(values):
        reads.append(values.numel())
        return real(values)

    monkeypatch.setattr(_device_transfers, "host_ints", counted)
    return reads


@pytest.mark.parametrize("shape", [[9, 7, 8], BIG], ids=["dense table", "sorted keys"])
def test_a_one_pass_submanifold_map_and_its_tables_read_the_device_twice(shape, one_pass, host_reads):
    indices = random_sites(shape, 150, seed=7)
    with SyncingOps() as ops:
        kmap = kernel_map.build_subm(indices, shape, (3, 3, 3), (1, 1, 1))
        kmap.tables()
    assert ops.seen == []
    assert len(host_reads) == 2  # the batch size; the counts per offset with the duplicate check


@pytest.mark.parametrize("transposed", [False, True])
def test_a_one_pass_strided_map_reads_the_device_three_times(transposed, one_pass, host_reads):
    shape = [9, 7, 8]
    indices = random_sites(shape, 150, seed=8)
    with SyncingOps() as ops:
        kmap = BUILDS["transposed" if transposed else "strided"](indices, shape)
        kmap.tables()
    # the output sites' unique (its size is the device's to know), and two counted reads
    assert len(ops.seen) == 1 and "unique" in ops.seen[0]
    assert len(host_reads) == 2


def test_a_tensor_checks_its_indices_in_one_read_and_layer_outputs_are_not_rechecked(one_pass, host_reads):
    indices = random_sites([9, 7, 8], 60, seed=9)
    x = spconv.SparseConvTensor(torch.randn(60, 3), indices, [9, 7, 8], 2)
    assert len(host_reads) == 1
    for layer in (spconv.SparseConv3d(3, 4, 3, stride=2, padding=1), spconv.SparseMaxPool3d(2, 2)):
        y = layer(x)
        assert len(host_reads) == 1 + 2  # the map's two reads; no check of the output's indices
        assert y.batch_size == 2 and y.indice_dict == {} and y.indices.dtype == torch.int32
        host_reads.clear()
        host_reads.append("x")
    with pytest.raises(ValueError, match="batch id 2 but batch_size is 2"):
        spconv.SparseConvTensor(torch.randn(60, 3), indices + torch.tensor([1, 0, 0, 0], dtype=torch.int32),
                                [9, 7, 8], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronizations (CPU: the tests above)")
def test_cuda_kernel_map_builds_synchronize_only_where_counted():
    import warnings
    shape = [9, 7, 8]
    indices = random_sites(shape, 150, seed=10).cuda()
    kernel_map.build_subm(indices, shape, (3, 3, 3), (1, 1, 1)).tables()  # warm-up (lazy CUDA state)
    kernel_map.build_conv(indices, shape, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)).tables()
    counts = {}
    torch.cuda.synchronize()
    for name, build in (("subm", lambda: kernel_map.build_subm(indices, shape, (3, 3, 3), (1, 1, 1))),
                        ("strided", lambda: kernel_map.build_conv(indices, shape, (3, 3, 3), (2, 2, 2), (1, 1, 1),
                                                                  (1, 1, 1)))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                build().tables()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts == {"subm": 2, "strided": 3}
