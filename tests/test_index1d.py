"""The CPU-fast 1-D index helpers against torch's own ops."""
import torch

from pointconv._index1d import flatnonzero, take


def test_flatnonzero_is_torch_nonzero():
    g = torch.Generator().manual_seed(0)
    for n, p in [(0, 0.5), (1, 1.0), (1000, 0.0), (1000, 1.0), (100_003, 0.15)]:
        mask = torch.rand(n, generator=g) < p
        got = flatnonzero(mask)
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.nonzero(mask).squeeze(1))
    strided = (torch.arange(40) % 3 == 0)[::2]  # not contiguous
    assert torch.equal(flatnonzero(strided), torch.nonzero(strided).squeeze(1))


def test_take_is_indexing():
    values = torch.randint(-(1 << 40), 1 << 40, (500,))
    idx = torch.randint(0, 500, (2000,))
    assert torch.equal(take(values, idx), values[idx])
