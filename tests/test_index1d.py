"""The CPU-fast 1-D index helpers against torch's own ops."""
import pytest
import torch

import pointconv
from pointconv import _index1d
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


@pytest.mark.parametrize("gather_takes_int32", [_index1d._gather_takes_int32(), False], ids=["this torch", "int64 only"])
def test_take_is_indexing(gather_takes_int32, monkeypatch):
    # torch 2.4's gather refuses int32 indices: take then goes through index_select
    monkeypatch.setattr(_index1d, "_GATHER_TAKES_INT32", gather_takes_int32)
    values = torch.randint(-(1 << 40), 1 << 40, (500,))
    idx = torch.randint(0, 500, (2000,))
    for i in (idx, idx.int()):
        assert torch.equal(take(values, i), values[idx])


def test_pointwise_conv_without_int32_gather(monkeypatch):
    """The neighbor build of Pointwise convolution on a torch whose gather takes only int64."""
    g = torch.Generator().manual_seed(0)
    pts, feats = torch.rand(2, 60, 3, generator=g), torch.randn(2, 60, 3, generator=g)
    weight = torch.randn(4, 3, 3, 3, 3, generator=g)
    expected = pointconv.pointwise_conv(pts, feats, weight, 0.2, 2)

    def gather_int64_only(values, dim, index, **kwargs):
        if index.dtype != torch.int64:
            raise RuntimeError("gather(): Expected dtype int64 for index")
        return torch_gather(values, dim, index, **kwargs)

    torch_gather = torch.gather
    monkeypatch.setattr(torch, "gather", gather_int64_only)
    monkeypatch.setattr(_index1d, "_GATHER_TAKES_INT32", _index1d._gather_takes_int32())
    assert not _index1d._GATHER_TAKES_INT32
    torch.testing.assert_close(pointconv.pointwise_conv(pts, feats, weight, 0.2, 2), expected, rtol=0, atol=0)
