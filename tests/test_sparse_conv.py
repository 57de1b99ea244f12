import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pointconv.sparse as spconv

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPARSE = {1: spconv.SparseConv1d, 2: spconv.SparseConv2d, 3: spconv.SparseConv3d, 4: spconv.SparseConv4d}
SUBM = {1: spconv.SubMConv1d, 2: spconv.SubMConv2d, 3: spconv.SubMConv3d, 4: spconv.SubMConv4d}
SHAPES = {1: [13], 2: [9, 8], 3: [7, 6, 5], 4: [5, 4, 4, 3]}


def random_sparse(ndim, batch, C, density=0.3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[ndim]
    active = torch.rand(batch, *shape, generator=g) < density
    dense = torch.randn(batch, *shape, C, generator=g, dtype=dtype) * active[..., None]
    idx = torch.nonzero(active).to(torch.int32)
    perm = torch.randperm(idx.shape[0], generator=g)  # any input order
    return spconv.SparseConvTensor(dense[active][perm], idx[perm], shape, batch)


def dense_conv(x, weight, bias, stride, padding, dilation, groups=1):
    """The dense convolution for any ndim: torch's for 1-3 D, a sum over kernel offsets for 4-D."""
    ndim = x.dim() - 2
    w = weight.movedim(-1, 1)  # (out, in/g, *k)
    if ndim in CONV:
        return CONV[ndim](x, w, bias, stride, padding, dilation, groups)
    assert groups == 1
    k = w.shape[2:]
    xp = F.pad(x, [p for pp in reversed(padding) for p in (pp, pp)])
    out_shape = [(n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, kk, s, p, d in zip(x.shape[2:], k, stride, padding, dilation)]
    out = 0
    for o in itertools.product(*[range(kk) for kk in k]):
        sl = tuple(slice(oi * d, oi * d + s * (n - 1) + 1, s) for oi, d, s, n in zip(o, dilation, stride, out_shape))
        out = out + torch.einsum("bi...,oi->bo...", xp[(slice(None), slice(None)) + sl], w[(slice(None), slice(None)) + o])
    return out + bias.view(1, -1, *[1] * ndim)


def site_mask(t):
    m = torch.zeros(t.batch_size, *t.spatial_shape, dtype=torch.bool)
    m[tuple(t.indices.long().unbind(1))] = True
    return m


CASES = [(k, s, p, d) for k in (1, 2, 3) for s in (1, 2, 3) for p in (0, 1, 2) for d in (1, 2)]


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("k,s,p,d", CASES)
def test_sparse_conv_equals_dense_conv(ndim, k, s, p, d):
    x = random_sparse(ndim, 2, 3, seed=k * 100 + s * 10 + p + d)
    in_shape = x.spatial_shape
    if any((n + 2 * p - d * (k - 1) - 1) < 0 for n in in_shape):
        pytest.skip("the window does not fit: torch refuses this configuration too")
    conv = SPARSE[ndim](3, 4, k, s, p, d).double()
    out = conv(x)
    ref = dense_conv(x.dense(), conv.weight, conv.bias, (s,) * ndim, (p,) * ndim, (d,) * ndim)
    assert out.spatial_shape == list(ref.shape[2:])
    # output sites: exactly those whose window touches an active input
    ones = torch.ones(1, 1, *[k] * ndim, dtype=torch.float64).movedim(1, -1)
    touched = dense_conv(site_mask(x)[:, None].double(), ones, torch.zeros(1, dtype=torch.float64),
                         (s,) * ndim, (p,) * ndim, (d,) * ndim)[:, 0] > 0
    assert torch.equal(site_mask(out), touched)
    keys = out.indices.long()
    if k == 1 and s == 1 and p == 0:  # spconv's conv1x1: the input's sites in the input's order
        assert torch.equal(out.indices, x.indices)
    else:
        assert torch.equal(keys, torch.unique(keys, dim=0))  # sorted by (batch, coords), no duplicates
    torch.testing.assert_close(out.dense() * touched[:, None], ref * touched[:, None])


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("k,d", [(1, 1), (2, 1), (3, 1), (3, 2), (4, 2), (5, 1)])
def test_subm_conv_equals_dense_conv_at_the_input_sites(ndim, k, d):
    x = random_sparse(ndim, 2, 3, seed=ndim + k + d)
    conv = SUBM[ndim](3, 5, k, dilation=d).double()
    out = conv(x)
    assert out.indices is x.indices  # same sites, same order
    ref = dense_conv(x.dense(), conv.weight, conv.bias, (1,) * ndim, ((k // 2) * d,) * ndim, (d,) * ndim)
    got = ref.movedim(1, -1)[tuple(x.indices.long().unbind(1))]
    torch.testing.assert_close(out.features, got)


def test_4d_strided_conv_equals_dense():
    x = random_sparse(4, 1, 2, seed=3)
    conv = spconv.SparseConv4d(2, 3, 2, 2, 1).double()
    out = conv(x)
    ref = dense_conv(x.dense(), conv.weight, conv.bias, (2,) * 4, (1,) * 4, (1,) * 4)
    m = site_mask(out)[:, None]
    torch.testing.assert_close(out.dense() * m, ref * m)


def test_groups_and_no_bias():
    x = random_sparse(3, 2, 4, seed=4)
    conv = spconv.SparseConv3d(4, 6, 3, 1, 1, groups=2, bias=False).double()
    out = conv(x)
    ref = dense_conv(x.dense(), conv.weight, torch.zeros(6, dtype=torch.float64), (1,) * 3, (1,) * 3, (1,) * 3, 2)
    m = site_mask(out)[:, None]
    torch.testing.assert_close(out.dense() * m, ref * m)
    assert conv.weight.shape == (6, 3, 3, 3, 2)  # spconv 2.x layout (out, *kernel, in / groups)


@pytest.mark.parametrize("subm", [False, True])
def test_gradients_to_second_order(subm):
    x = random_sparse(2, 1, 2, density=0.5, seed=5)
    conv = (spconv.SubMConv2d(2, 2, 3) if subm else spconv.SparseConv2d(2, 2, 3, 2, 1)).double()
    feats = x.features.clone().requires_grad_()

    def fn(f, w, b):
        return torch.func.functional_call(conv, {"weight": w, "bias": b}, (x.replace_feature(f),)).features

    args = (feats, conv.weight.detach().clone().requires_grad_(), conv.bias.detach().clone().requires_grad_())
    torch.autograd.gradcheck(fn, args)
    torch.autograd.gradgradcheck(fn, args)


def test_indice_key_reuses_the_kernel_map():
    x = random_sparse(3, 1, 3, seed=6)
    a = spconv.SubMConv3d(3, 3, 3, indice_key="subm1").double()
    b = spconv.SubMConv3d(3, 3, 3, indice_key="subm1").double()
    y = a(x)
    kmap = y.indice_dict["subm1"]
    z = b(y)
    assert z.indice_dict["subm1"] is kmap


def test_indice_key_rules_follow_spconv():
    x = random_sparse(3, 1, 3, seed=6)
    y = spconv.SubMConv3d(3, 3, 3, indice_key="s").double()(x)
    with pytest.raises(ValueError, match="same kernel_size: \\[3, 3, 3\\] there, \\[5, 5, 5\\] here"):
        spconv.SubMConv3d(3, 3, 5, indice_key="s").double()(y)
    with pytest.raises(ValueError, match="same dilation"):
        spconv.SubMConv3d(3, 3, 3, dilation=2, indice_key="s").double()(y)
    down = spconv.SparseConv3d(3, 3, 3, 2, 1, indice_key="d").double()
    z = down(x)
    # a submanifold layer on a strided conv's key would replace the map an inverse conv needs
    with pytest.raises(ValueError, match="belongs to a strided"):
        spconv.SubMConv3d(3, 3, 3, indice_key="d").double()(z)
    for layer in (spconv.SparseConv3d(3, 3, 3, 2, 1, indice_key="d"), spconv.SparseMaxPool3d(2, indice_key="d"),
                  spconv.SparseConvTranspose3d(3, 3, 3, 2, indice_key="d")):
        with pytest.raises(ValueError, match="needs a key of its own"):
            layer.double()(z)


def test_each_output_gets_its_own_copy_of_the_indice_dict():
    # spconv's semantics: a layer's output holds a copy of its input's dict plus its own map, so
    # branches do not see each other's keys and the same input can run through a network twice
    x = random_sparse(3, 1, 3, seed=8)
    net = spconv.SparseSequential(spconv.SubMConv3d(3, 3, 3, indice_key="s"),
                                  spconv.SparseConv3d(3, 3, 3, 2, 1, indice_key="d"),
                                  spconv.SparseInverseConv3d(3, 3, 3, indice_key="d")).double()
    first = net(x)
    assert x.indice_dict == {} and set(first.indice_dict) == {"s", "d"}
    torch.testing.assert_close(net(x).features, first.features)
    left = spconv.SparseConv3d(3, 3, 3, 2, 1, indice_key="a").double()(x)
    right = spconv.SparseMaxPool3d(2, 2, indice_key="b")(x)
    assert set(left.indice_dict) == {"a"} and set(right.indice_dict) == {"b"}


def test_sequential_with_plain_modules_and_empty_input():
    net = spconv.SparseSequential(spconv.SubMConv3d(3, 8, 3), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                  spconv.SparseConv3d(8, 4, 3, 2, 1)).double()
    x = random_sparse(3, 2, 3, seed=7)
    y = net(x)
    assert y.features.shape[1] == 4 and bool((y.features.shape[0] > 0))
    empty = spconv.SparseConvTensor(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.int32),
                                    [7, 6, 5], 2)
    net.eval()
    out = net(empty)
    assert out.features.shape == (0, 4) and out.spatial_shape == [4, 3, 3]
    assert out.dense().shape == (2, 4, 4, 3, 3) and bool((out.dense() == 0).all())


def test_dense_round_trip_and_replace_feature():
    x = random_sparse(2, 2, 3, seed=8)
    back = spconv.SparseConvTensor.from_dense(x.dense(channels_first=False))
    assert torch.equal(back.dense(), x.dense())
    y = x.replace_feature(x.features * 2)
    assert y.indices is x.indices and torch.equal(y.dense(), 2 * x.dense())
    assert x.spatial_size == 9 * 8


@pytest.mark.parametrize("channels_first", [True, False])
def test_dense_values_and_gradients(channels_first):
    x = random_sparse(3, 2, 3, seed=10)
    expect = torch.zeros(2, *x.spatial_shape, 3, dtype=torch.float64)
    for site, f in zip(x.indices.tolist(), x.features):
        expect[tuple(site)] = f
    got = x.dense(channels_first)
    assert torch.equal(got, expect.movedim(-1, 1) if channels_first else expect) and got.is_contiguous()
    fn = lambda f: x.replace_feature(f).dense(channels_first).square()  # noqa: E731
    feats = x.features.clone().requires_grad_()
    torch.autograd.gradcheck(fn, (feats,))
    torch.autograd.gradgradcheck(fn, (feats,))
    with pytest.raises(TypeError, match="channels_first must be a bool"):
        x.dense("no")  # a string would read as True


def test_dense_holds_one_grid():
    # the grid written out of place, then made channels first, held two to three grids at once
    code = """
import re, torch
import pointconv.sparse as spconv
def kib(field):  # this process's resident set: now (VmRSS) or at its peak since the reset (VmHWM)
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
g = torch.Generator().manual_seed(0)
n, C, s = 20000, 16, 96
lin = torch.randperm(2 * s ** 3, generator=g)[:n]
b, rest = lin // s ** 3, lin % s ** 3
idx = torch.stack([b, rest // (s * s), (rest // s) % s, rest % s], 1).int()
x = spconv.SparseConvTensor(torch.randn(n, C, generator=g), idx, [s, s, s], 2)
del lin, b, rest
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
for channels_first in (False, True):
    out = x.dense(channels_first)
    del out
print((kib("VmHWM") - before) / (2 * s ** 3 * C * 4 / 1024))
"""
    grids = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.8 < grids < 1.4


def test_deterministic_repeated_runs():
    x = random_sparse(3, 2, 8, density=0.6, seed=9, dtype=torch.float32)
    conv = spconv.SparseConv3d(8, 8, 3, 2, 1)
    runs = []
    for _ in range(2):
        conv.zero_grad()
        f = x.features.clone().requires_grad_()
        out = conv(x.replace_feature(f))
        out.features.square().sum().backward()
        runs.append((out.features, f.grad, conv.weight.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: spconv.SparseConvTensor(torch.zeros(2, 3), torch.tensor([[0, 1], [0, 1]], dtype=torch.int32), [4], 1),
     None, None),
    (lambda: spconv.SparseConvTensor(torch.zeros(2, 3), torch.tensor([[0, 1], [0, 4]], dtype=torch.int32), [4], 1),
     ValueError, "outside spatial_shape"),
    (lambda: spconv.SparseConvTensor(torch.zeros(2, 3), torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), [4], 2),
     ValueError, "batch id 2 but batch_size is 2"),
    (lambda: spconv.SparseConvTensor(torch.zeros(2, 3), torch.tensor([[0, -1], [0, 0]], dtype=torch.int32), [4], 1),
     ValueError, "non-negative"),
    (lambda: spconv.SparseConvTensor(torch.zeros(2, 3), torch.tensor([[0, 1], [0, 0]]), [4], 1),
     TypeError, "indices must be an int32"),
    (lambda: spconv.SparseConvTensor(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int32), [4], 1),
     ValueError, r"indices must have shape \(2, 2\)"),
])
def test_bad_tensors(make, exc, match):
    if exc is None:  # duplicates are caught by the first convolution
        t = make()
        with pytest.raises(ValueError, match="duplicate sites"):
            spconv.SubMConv1d(3, 3, 3)(t)
        return
    with pytest.raises(exc, match=match):
        make()


def test_bad_layers_and_channel_mismatch():
    x = random_sparse(3, 1, 3, seed=10)
    with pytest.raises(ValueError, match="expects 4"):
        spconv.SubMConv3d(4, 4, 3).double()(x)
    with pytest.raises(ValueError, match="stride 1"):
        spconv.SubMConv3d(3, 3, 3, stride=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        spconv.SparseConv3d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        spconv.SparseConv3d(3, 4, 0)
    with pytest.raises(ValueError, match="output spatial shape would be"):
        spconv.SparseConv3d(3, 4, 9).double()(x)
    with pytest.raises(ValueError, match="spatial dimensions"):
        spconv.SparseConv2d(3, 4, 3).double()(x)


def test_sorted_key_lookup_for_large_grids(monkeypatch):
    """Grids too large for the dense row table use sorted keys and searchsorted: same results."""
    from pointconv.sparse import kernel_map

    x = random_sparse(3, 2, 3, seed=11)
    convs = [spconv.SubMConv3d(3, 4, 3).double(), spconv.SparseConv3d(3, 4, 3, 2, 1).double(),
             spconv.SparseConvTranspose3d(3, 4, 3, 2, 1).double()]
    dense_path = [c(x) for c in convs]
    monkeypatch.setattr(kernel_map, "_DENSE_TABLE_MAX_CELLS", 0)
    for conv, ref in zip(convs, dense_path):
        out = conv(x)
        assert torch.equal(out.indices, ref.indices)
        torch.testing.assert_close(out.features, ref.features)
    dup = spconv.SparseConvTensor(torch.zeros(2, 3), torch.tensor([[0, 1], [0, 1]], dtype=torch.int32), [4], 1)
    with pytest.raises(ValueError, match="duplicate sites"):
        spconv.SubMConv1d(3, 3, 3)(dup)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_the_region_dtype(dtype):
    x = random_sparse(3, 2, 8, seed=12, dtype=torch.float32)
    net = spconv.SparseSequential(spconv.SubMConv3d(8, 16, 3), torch.nn.ReLU(), spconv.SparseConv3d(16, 8, 3, 2, 1))
    ref = net(x)
    with torch.autocast("cpu", dtype=dtype):
        out = net(x)
    assert out.features.dtype == dtype
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.features.float(), ref.features, rtol=5e-2, atol=5e-2)
    out.features.float().square().sum().backward()  # gradients flow back to the fp32 weights
    assert net[0].weight.grad is not None and net[0].weight.grad.dtype == torch.float32
    # autocast casts float32 only (as torch's layers): a float64 network stays float64
    x64, net64 = random_sparse(3, 2, 8, seed=12), net.double()
    with torch.autocast("cpu", dtype=dtype):
        out64 = net64(x64)
    assert out64.features.dtype == torch.float64
    torch.testing.assert_close(out64.features, net64(x64).features, rtol=0, atol=0)
