"""Same weights, same numbers as spconv 2.3.8, where the spconv CPU wheel is installed (an extra check).

spconv's CPU kernels race when torch runs more than one thread: with 2 threads its stride-1,
transposed and inverse convolutions changed from run to run here (by up to 0.36 for the same
input). The comparison therefore runs spconv on one thread; ours is deterministic on any number.
"""
import pytest
import torch

import pointconv.sparse as ours

spconv = pytest.importorskip("spconv.pytorch")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(seed=0, C=4, shape=(10, 9, 8), batch=2):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, *shape, generator=g) < 0.25
    # contiguous: spconv 2.3.8 silently misreads a non-contiguous indices tensor (nonzero().int() is one)
    idx = torch.nonzero(active).int().contiguous()
    feats = torch.randn(idx.shape[0], C, generator=g)
    return (ours.SparseConvTensor(feats, torch.nonzero(active).int(), list(shape), batch),
            spconv.SparseConvTensor(feats, idx, list(shape), batch))


def _sorted(features, indices):
    order = torch.unique(indices.long(), dim=0, return_inverse=True)[1].argsort()
    return features[order], indices[order]


@pytest.mark.parametrize("kind,k,s,p,d", [("subm", 3, 1, 0, 1), ("subm", 3, 1, 0, 2), ("conv", 3, 2, 1, 1),
                                          ("conv", 2, 2, 0, 1), ("conv", 3, 1, 1, 2), ("transpose", 3, 2, 1, 1)])
def test_layer_parity(kind, k, s, p, d):
    a, b = _pair()
    cls = {"subm": "SubMConv3d", "conv": "SparseConv3d", "transpose": "SparseConvTranspose3d"}[kind]
    kwargs = dict(dilation=d) if kind == "subm" else dict(stride=s, padding=p, dilation=d)
    mine, theirs = getattr(ours, cls)(4, 5, k, **kwargs), getattr(spconv, cls)(4, 5, k, **kwargs)
    mine.load_state_dict(theirs.state_dict())  # spconv checkpoints load unchanged
    ya, yb = mine(a), theirs(b)
    assert ya.spatial_shape == list(yb.spatial_shape)
    fa, ia = _sorted(ya.features, ya.indices)
    fb, ib = _sorted(yb.features, yb.indices)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-5)


def test_inverse_and_pool_parity():
    a, b = _pair(seed=1)
    down_t, up_t = spconv.SparseConv3d(4, 6, 3, 2, 1, indice_key="d"), spconv.SparseInverseConv3d(6, 4, 3, indice_key="d")
    down_m, up_m = ours.SparseConv3d(4, 6, 3, 2, 1, indice_key="d"), ours.SparseInverseConv3d(6, 4, 3, indice_key="d")
    down_m.load_state_dict(down_t.state_dict())
    up_m.load_state_dict(up_t.state_dict())
    za, zb = up_m(down_m(a)), up_t(down_t(b))
    fa, ia = _sorted(za.features, za.indices)
    fb, ib = _sorted(zb.features, zb.indices)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-5)
    pa, pb = ours.SparseMaxPool3d(2, 2)(a), spconv.SparseMaxPool3d(2, 2)(b)
    fa, ia = _sorted(pa.features, pa.indices)
    fb, ib = _sorted(pb.features, pb.indices)
    assert torch.equal(ia, ib)
    # spconv's max pool starts from 0, so it returns max(0, max over active inputs); ours is the max
    # over active inputs only (DESIGN.md 5.3), which differs exactly where every active input is < 0.
    assert bool((fa < 0).any())
    torch.testing.assert_close(fa.clamp(min=0), fb)

