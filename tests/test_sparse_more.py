"""Transposed and inverse convolutions, pooling, tables and sparse_add against dense math."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pointconv.sparse as spconv
from test_sparse_conv import dense_conv, random_sparse, site_mask

TRANSPOSE = {1: spconv.SparseConvTranspose1d, 2: spconv.SparseConvTranspose2d, 3: spconv.SparseConvTranspose3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAXPOOL = {1: (spconv.SparseMaxPool1d, F.max_pool1d), 2: (spconv.SparseMaxPool2d, F.max_pool2d),
           3: (spconv.SparseMaxPool3d, F.max_pool3d)}
AVGPOOL = {1: spconv.SparseAvgPool1d, 2: spconv.SparseAvgPool2d, 3: spconv.SparseAvgPool3d}


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("k,s,p,d", [(1, 1, 0, 1), (2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2), (3, 3, 2, 1)])
def test_transposed_conv_equals_dense(ndim, k, s, p, d):
    x = random_sparse(ndim, 2, 3, seed=k + s + p + d)
    conv = TRANSPOSE[ndim](3, 4, k, s, p, d).double()
    out = conv(x)
    # dense ConvTranspose weight (in, out, *k) = ours (out, *k, in) transposed
    w = conv.weight.movedim(-1, 0).movedim(1, 1)
    ref = CONV_T[ndim](x.dense(), w, conv.bias, s, p, 0, 1, d)
    assert out.spatial_shape == list(ref.shape[2:])
    ones = torch.ones(1, 1, *[k] * ndim, dtype=torch.float64)
    touched = CONV_T[ndim](site_mask(x)[:, None].double(), ones, None, s, p, 0, 1, d)[:, 0] > 0
    assert torch.equal(site_mask(out), touched)
    torch.testing.assert_close(out.dense() * touched[:, None], ref * touched[:, None])


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 0)])
def test_inverse_conv_restores_the_input_sites(k, s, p):
    x = random_sparse(3, 2, 3, seed=11 + k)
    down = spconv.SparseConv3d(3, 4, k, s, p, indice_key="down").double()
    up = spconv.SparseInverseConv3d(4, 5, k, indice_key="down").double()
    y = down(x)
    z = up(y)
    assert torch.equal(z.indices, x.indices) and z.spatial_shape == x.spatial_shape
    # the transposed convolution with the same geometry, read at the input sites
    w = up.weight.movedim(-1, 0)
    plain = [(n - 1) * s - 2 * p + k for n in y.spatial_shape]
    extra = tuple(n - r for n, r in zip(x.spatial_shape, plain))  # the rows the stride dropped
    ref = F.conv_transpose3d(y.dense(), w, up.bias, s, p, output_padding=extra)
    expect = ref.movedim(1, -1)[tuple(x.indices.long().unbind(1))]
    torch.testing.assert_close(z.features, expect)


def test_inverse_conv_errors():
    x = random_sparse(3, 1, 3, seed=12)
    with pytest.raises(ValueError, match="needs the indice_key"):
        spconv.SparseInverseConv3d(3, 3, 3, indice_key=None)
    with pytest.raises(ValueError, match="no strided convolution with indice_key 'k'"):
        spconv.SparseInverseConv3d(3, 3, 3, indice_key="k").double()(x)
    y = spconv.SparseConv3d(3, 3, 3, 2, 1, indice_key="k").double()(x)
    with pytest.raises(ValueError, match="has kernel"):
        spconv.SparseInverseConv3d(3, 3, 2, indice_key="k").double()(y)
    assert "k" not in x.indice_dict  # the conv's output holds a copy of the dict, as in spconv
    other_sites = spconv.SparseConvTensor(x.features, x.indices, x.spatial_shape, x.batch_size,
                                          indice_dict=y.indice_dict)
    with pytest.raises(ValueError, match="not the outputs"):
        spconv.SparseInverseConv3d(3, 3, 3, indice_key="k").double()(other_sites)

    # a batch whose sites have no strided output (kernel 1, stride 2, odd coordinates): a tensor of
    # those outputs may say batch_size 1, but the inverse conv's outputs are the inputs' 2 batches
    sites = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.int32)
    down = spconv.SparseConv3d(3, 3, 1, 2, indice_key="d")(spconv.SparseConvTensor(torch.randn(2, 3), sites, [4] * 3, 2))
    assert down.indices.tolist() == [[0, 0, 0, 0]]
    one_batch = spconv.SparseConvTensor(down.features, down.indices, down.spatial_shape, 1, indice_dict=down.indice_dict)
    with pytest.raises(ValueError, match="inputs in 2 batches, this inverse convolution's input has batch_size 1"):
        spconv.SparseInverseConv3d(3, 3, 1, indice_key="d")(one_batch)
    assert spconv.SparseInverseConv3d(3, 3, 1, indice_key="d")(down).indices.tolist() == sites.tolist()


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("k,s,p,d", [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2), (2, None, 1, 1)])
def test_max_pool_over_active_inputs(ndim, k, s, p, d):
    x = random_sparse(ndim, 2, 3, seed=ndim * 7 + k)
    x = x.replace_feature(x.features - 5)  # all negative: a dense max over zeros would differ
    pool_cls, dense_pool = MAXPOOL[ndim]
    out = pool_cls(k, s, p, d)(x)
    filled = x.dense().masked_fill(~site_mask(x)[:, None], float("-inf"))
    ref = dense_pool(F.pad(filled, [p] * 2 * ndim, value=float("-inf")), k, k if s is None else s, 0, d)
    m = site_mask(out)
    assert torch.equal(m, torch.isfinite(ref[:, 0]))
    torch.testing.assert_close(out.dense() * m[:, None], torch.where(m[:, None], ref, 0))


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_avg_pool_over_active_inputs(ndim):
    x = random_sparse(ndim, 2, 3, seed=20 + ndim)
    out = AVGPOOL[ndim](3, 2, 1)(x)
    C = 3
    ones = torch.ones(C, *[3] * ndim, 1, dtype=torch.float64)
    sums = dense_conv(x.dense(), ones, torch.zeros(C, dtype=torch.float64), (2,) * ndim, (1,) * ndim, (1,) * ndim, C)
    counts = dense_conv(site_mask(x)[:, None].double(), ones[:1], torch.zeros(1, dtype=torch.float64),
                        (2,) * ndim, (1,) * ndim, (1,) * ndim)
    m = site_mask(out)[:, None]
    torch.testing.assert_close(out.dense() * m, torch.where(m, sums / counts.clamp(min=1), 0))


def test_pool_gradients():
    x = random_sparse(2, 1, 2, density=0.6, seed=30)
    f = x.features.clone().requires_grad_()
    torch.autograd.gradcheck(lambda f: spconv.SparseMaxPool2d(2)(x.replace_feature(f)).features, (f,))
    torch.autograd.gradcheck(lambda f: spconv.SparseAvgPool2d(3, 2, 1)(x.replace_feature(f)).features, (f,))
    torch.autograd.gradgradcheck(lambda f: spconv.SparseAvgPool2d(3, 2, 1)(x.replace_feature(f)).features ** 2, (f,))


def test_global_pools():
    x = random_sparse(3, 3, 4, seed=31)
    keep = x.indices[:, 0] != 2  # sample 2 has no sites
    x = spconv.SparseConvTensor(x.features[keep], x.indices[keep], x.spatial_shape, 3)
    gmax = spconv.SparseGlobalMaxPool()(x)
    gavg = spconv.SparseGlobalAvgPool()(x)
    for b in range(2):
        fb = x.features[x.indices[:, 0] == b]
        torch.testing.assert_close(gmax[b], fb.max(0).values)
        torch.testing.assert_close(gavg[b], fb.mean(0))
    assert bool((gmax[2] == 0).all()) and bool((gavg[2] == 0).all())


def test_tables_and_sparse_add():
    x = random_sparse(2, 2, 3, seed=32)
    a = spconv.SubMConv2d(3, 3, 3).double()
    b = spconv.SubMConv2d(3, 3, 1).double()
    outs = spconv.ConcatTable(a, b)(x)
    added = spconv.AddTable()(outs)
    torch.testing.assert_close(added.features, outs[0].features + outs[1].features)
    joined = spconv.JoinTable()(outs)
    assert joined.features.shape == (x.features.shape[0], 6)
    y = spconv.SparseConv2d(3, 3, 3, 1, 1).double()(x)  # more sites than x
    s = spconv.functional.sparse_add(x, y)
    torch.testing.assert_close(s.dense(), x.dense() + y.dense())
    keys = s.indices.long()
    assert torch.equal(keys, torch.unique(keys, dim=0))
    with pytest.raises(ValueError, match="same sites"):
        spconv.AddTable()([x, y])
    # a site twice in one tensor: a clear error, as in every layer (spconv sums the rows silently)
    dup = spconv.SparseConvTensor(torch.ones(3, 3, dtype=torch.float64), torch.tensor([[0, 1, 1], [1, 0, 0], [0, 1, 1]],
                                  dtype=torch.int32), x.spatial_shape, 2)
    for args, which in (((x, dup), 1), ((dup, x, y), 0)):
        with pytest.raises(ValueError, match=f"tensor {which} has duplicate sites"):
            spconv.functional.sparse_add(*args)


def test_concat_table_and_modules():
    x = random_sparse(3, 2, 4, seed=33)
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 4, 3), spconv.SparseBatchNorm(4), spconv.SparseReLU())
    net = net.double()
    outs = spconv.ConcatTable(net, spconv.SubMConv3d(4, 4, 1).double())(x)
    assert len(outs) == 2 and bool((outs[0].features >= 0).all())
    dense = spconv.SparseSequential(spconv.SparseConv3d(4, 2, 3, 2, 1), spconv.ToDense()).double()(x)
    assert dense.shape == (2, 2, 4, 3, 3)


def test_feature_wise_modules_match_torchs():
    """SparseBatchNorm / SparseReLU / SparseIdentity are the torch modules (spconv's state_dict keys)."""
    x = random_sparse(3, 2, 4, seed=34)
    bn = spconv.SparseBatchNorm(4).double().train()
    ref = nn.BatchNorm1d(4).double().train()
    assert list(bn.state_dict()) == list(ref.state_dict())  # "weight", not "bn.weight"
    torch.testing.assert_close(bn(x).features, ref(x.features))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn(x.features), ref(x.features))  # plain tensors too
    assert torch.equal(spconv.SparseReLU()(x).features, x.features.relu())
    assert spconv.SparseIdentity()(x).features is x.features
    empty = spconv.SparseConvTensor(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.int32),
                                    [3, 3, 3], 1)
    assert bn(empty).features.shape == (0, 4)  # torch's BatchNorm1d refuses 0 rows in training
    seq = spconv.SparseSequential(spconv.SubMConv3d(4, 4, 3, algo=spconv.ConvAlgo.Native))
    with pytest.raises(ValueError, match="already"):
        seq.add(nn.ReLU(), name="0")
    spconv.assign_name_for_sparse_modules(seq)
    assert seq[0]._sparse_unique_name == "0"
    with pytest.raises(TypeError, match="torch.nn.Module"):
        spconv.assign_name_for_sparse_modules([seq])
    assert spconv.RemoveGrid()(x).grid is None
    with pytest.raises(TypeError, match="must be a SparseConvTensor"):
        spconv.RemoveGrid()(x.features)


def test_tensor_helpers():
    x = random_sparse(3, 2, 4, seed=35)
    y = spconv.SubMConv3d(4, 4, 3, indice_key="k").double()(x)
    assert torch.equal(y.minus().features, -y.features)
    copy = y.shadow_copy()
    assert copy is not y and copy.features is y.features and copy.indice_dict is y.indice_dict
    keep = y.features[:, 0] > 0
    part = y.select_by_index(keep)
    assert torch.equal(part.indices, y.indices[keep]) and torch.equal(part.features, y.features[keep])
    assert part.indice_dict == {} and "k" in y.indice_dict  # y keeps its kernel maps
    rows = torch.nonzero(keep)[:, 0]
    assert torch.equal(y.select_by_index(rows).dense(), part.dense())
    n = y.indices.shape[0]
    with pytest.raises(ValueError, match=r"mask must have shape"):
        y.select_by_index(keep[:-1])
    with pytest.raises(ValueError, match=rf"must lie in \[-{n}, {n - 1}\]"):
        y.select_by_index(torch.tensor([0, n]))
    with pytest.raises(TypeError, match="index tensor"):
        y.select_by_index(torch.tensor([0.0]))
    twice = y + y
    torch.testing.assert_close(twice.features, 2 * y.features)
    torch.testing.assert_close((y.features + y).features, 2 * y.features)  # a plain tensor on the left
    z = y.replace_feature(y.features.clone())
    z += y
    torch.testing.assert_close(z.features, 2 * y.features)
    shuffled = spconv.SparseConvTensor(y.features.flip(0), y.indices.flip(0), y.spatial_shape, y.batch_size)
    with pytest.raises(ValueError, match="same sites"):
        y + shuffled
    with pytest.raises(TypeError, match="SparseConvTensor or a torch.Tensor"):
        y + 1.0


def test_layer_input_errors():
    idx = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)
    ints = spconv.SparseConvTensor(torch.ones(2, 4, dtype=torch.long), idx, [4, 4, 4], 1)
    for layer in (spconv.SubMConv3d(4, 4, 3), spconv.SparseConv3d(4, 4, 2, 2), spconv.SparseMaxPool3d(2),
                  spconv.SparseGlobalMaxPool(), spconv.SparseGlobalAvgPool()):
        with pytest.raises(TypeError, match="features must be floating point"):
            layer(ints)  # integer features would cast the weights to integers (all zeros here)
        with pytest.raises(TypeError, match="must be a SparseConvTensor"):
            layer(torch.ones(2, 4))
    # a float tensor's elements convert with int() too (4.9 -> 4): named, not truncated
    for shape in ([4.5, 4, 4], [True, 4, 4], torch.tensor([4.9, 4.0, 4.0])):
        with pytest.raises(TypeError, match="spatial_shape must be an int"):
            spconv.SparseConvTensor(torch.rand(2, 4), idx, shape, 1)
    for shape in (4, None, "444", torch.tensor(4)):
        with pytest.raises(TypeError, match="spatial_shape must be a list of ints"):
            spconv.SparseConvTensor(torch.rand(2, 4), idx, shape, 1)
    assert spconv.SparseConvTensor(torch.rand(2, 4), idx, torch.tensor([4, 5, 6]), 1).spatial_shape == [4, 5, 6]
    with pytest.raises(ValueError, match="dense"):
        spconv.SparseConvTensor(torch.rand(2, 4), idx, [10**6] * 3, 1).dense()


def test_global_max_pool_keeps_infinite_maxima():
    idx = torch.tensor([[0, 0, 0], [2, 1, 1]], dtype=torch.int32)
    x = spconv.SparseConvTensor(torch.tensor([[float("inf"), -1.0], [float("-inf"), 2.0]]), idx, [2, 2], 3)
    out = spconv.SparseGlobalMaxPool()(x)
    assert torch.equal(out, torch.tensor([[float("inf"), -1.0], [0.0, 0.0], [float("-inf"), 2.0]]))


def test_max_pool_gradients_at_minus_infinity():
    # a window (or sample) whose max is -inf: the gradient is 1, split evenly between exact ties
    # (torch's backward had counted the rows' -inf starting value as one more tie)
    inf = float("inf")
    idx = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 2, 2], [1, 1, 1]], dtype=torch.int32)
    feats = torch.tensor([[-inf], [-inf], [-inf], [2.0]], requires_grad=True)
    x = spconv.SparseConvTensor(feats, idx, [4, 4], 2)
    pooled = spconv.SparseMaxPool2d(2, 2)(x)  # windows: {0, 1} tied at -inf, {2} alone at -inf, {3}
    grad, = torch.autograd.grad(pooled.features.sum(), feats)
    assert grad[:, 0].tolist() == [0.5, 0.5, 1.0, 1.0]
    grad, = torch.autograd.grad(spconv.SparseGlobalMaxPool()(x).sum(), feats)
    torch.testing.assert_close(grad[:, 0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))


def test_table_and_hash_input_errors():
    with pytest.raises(ValueError, match="non-empty list"):
        spconv.AddTable()([])
    with pytest.raises(ValueError, match="non-empty list"):
        spconv.JoinTable()([])
    with pytest.raises(TypeError, match="argument 0 is a Tensor"):
        spconv.functional.sparse_add(torch.rand(3))
    table = spconv.HashTable(torch.device("cpu"), torch.int64, torch.int32, 10)
    with pytest.raises(TypeError, match="value_dtype"):
        table.insert(torch.tensor([1, 2]), torch.tensor([1.5, 2.7]))  # would truncate to 1, 2


def test_unknown_keywords_raise_as_in_spconv():
    """spconv 2.x's layers take no **kwargs: a misspelt argument must not be dropped silently."""
    with pytest.raises(TypeError, match="paddings"):
        spconv.SparseConv3d(4, 4, 3, stride=2, paddings=1)
    with pytest.raises(TypeError, match="indice_keys"):
        spconv.SubMConv3d(4, 4, 3, indice_keys="subm1")
    with pytest.raises(TypeError, match="strides"):
        spconv.SparseMaxPool3d(2, strides=2)
    with pytest.raises(TypeError, match="use_hash"):
        spconv.SparseInverseConv3d(4, 4, 3, indice_key="k", use_hash=False)
    with pytest.raises(TypeError, match="spatial_shapes"):
        spconv.SparseConvTensor(torch.rand(1, 4), torch.zeros(1, 4, dtype=torch.int32), [4, 4, 4], 1,
                                spatial_shapes=[4, 4, 4])


@pytest.mark.parametrize("act,fn", [("ReLU", torch.relu), ("Sigmoid", torch.sigmoid),
                                    ("LeakyReLU", lambda x: F.leaky_relu(x, 0.2))])
def test_fused_activation_of_sparse_convolution(act, fn):
    from pointconv.sparse.conv import SparseConvolution

    x = random_sparse(3, 2, 4, seed=36)
    plain = SparseConvolution(3, 4, 5, 3, subm=True).double()
    fused = SparseConvolution(3, 4, 5, 3, subm=True, act_type=act, act_alpha=0.2).double()
    fused.load_state_dict(plain.state_dict())
    torch.testing.assert_close(fused(x).features, fn(plain(x).features))
    with pytest.raises(ValueError, match="act_type must be one of"):
        SparseConvolution(3, 4, 5, 3, act_type="GELU")
    with pytest.raises(TypeError, match="act_alpha must be a number"):
        SparseConvolution(3, 4, 5, 3, act_type="LeakyReLU", act_alpha="0.1")
    try:  # spconv's own enum (cumm), where installed: read by its name
        from cumm import tensorview as tv
    except ImportError:
        return
    assert SparseConvolution(3, 4, 5, 3, act_type=getattr(tv.gemm.Activation, act)).act_type == act


def test_a_kernel_map_built_in_inference_mode_leaves_no_inference_table_behind(monkeypatch):
    """The dense site table kept for the next kernel map was an inference tensor when made inside
    torch.inference_mode (a validation pass), and the next map outside it failed writing to it."""
    from pointconv.sparse import kernel_map
    monkeypatch.setattr(kernel_map, "_spare_tables", [])  # (no spare left by earlier tests)
    idx = torch.tensor([[0, 1, 2, 3], [0, 2, 2, 3], [0, 4, 4, 4]], dtype=torch.int32)
    x = spconv.SparseConvTensor(torch.randn(3, 4), idx, [9, 9, 9], 1)
    conv = spconv.SubMConv3d(4, 4, 3)
    with torch.inference_mode():
        expect = conv(x).features
    got = conv(x).features
    assert torch.equal(got, expect) and got.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_average_pools_of_half_features_sum_in_float32(dtype):
    """fp16 sums pass 65504 long before the means do (they were inf); the result keeps the dtype."""
    n = 8000
    coords = torch.stack(torch.unravel_index(torch.arange(n), (20, 20, 20)), 1)
    idx = torch.cat([torch.zeros(n, 1, dtype=torch.long), coords], 1).int()
    features = (torch.arange(2 * n, dtype=torch.float32).view(n, 2) % 7 + 10).to(dtype)
    x = spconv.SparseConvTensor(features, idx, [20, 20, 20], 1)
    got = spconv.SparseGlobalAvgPool()(x)
    assert got.dtype == dtype and torch.equal(got, features.float().mean(0, keepdim=True).to(dtype))
    corners = torch.stack(torch.unravel_index(torch.arange(8), (2, 2, 2)), 1)
    block_idx = torch.cat([torch.zeros(8, 1, dtype=torch.long), corners], 1).int()
    block = spconv.SparseConvTensor(torch.full((8, 2), 30000.0, dtype=dtype), block_idx, [2, 2, 2], 1)
    pooled = spconv.SparseAvgPool3d(2, 2)(block).features
    assert pooled.dtype == dtype and torch.equal(pooled, torch.full((1, 2), 30000.0, dtype=dtype))


# -- one-tap layers that leave the sites in place (spconv's conv1x1) -------------------------------

ONE_TAP = {"SparseConv3d": lambda: spconv.SparseConv3d(3, 4, 1),
           "SparseConvTranspose3d": lambda: spconv.SparseConvTranspose3d(3, 4, 1),
           "SubMConv3d": lambda: spconv.SubMConv3d(3, 4, 1),
           "SparseConv3d, groups": lambda: spconv.SparseConv3d(3, 6, 1, groups=3),
           "SparseMaxPool3d": lambda: spconv.SparseMaxPool3d(1),
           "SparseAvgPool3d": lambda: spconv.SparseAvgPool3d(1)}


@pytest.mark.parametrize("name", list(ONE_TAP))
def test_one_tap_layers_keep_the_input_sites_in_order(name):
    # as spconv's: the input's sites in the input's order (random_sparse shuffles them), so a
    # residual y.features + x.features or a channel attention pool(x).features * x.features lines up
    x = random_sparse(3, 2, 3, seed=21)
    layer = ONE_TAP[name]().double()
    y = layer(x)
    assert y.indices is x.indices and y.spatial_shape == x.spatial_shape
    if "Pool" in name:
        assert torch.equal(y.features, x.features)
    else:  # the dense math: weight (out, 1, 1, 1, in / groups) per site, block-diagonal over groups
        w = layer.weight.detach().reshape(layer.out_channels, -1)
        og, ig = layer.out_channels // layer.groups, 3 // layer.groups
        full = torch.zeros(layer.out_channels, 3, dtype=torch.float64)
        for g in range(layer.groups):
            full[g * og:(g + 1) * og, g * ig:(g + 1) * ig] = w[g * og:(g + 1) * og]
        torch.testing.assert_close(y.features, x.features @ full.t() + layer.bias)


def test_one_tap_convolutions_neither_check_nor_record_their_key():
    # spconv's conv1x1 returns before it looks at indice_key: public models pass a block's key to
    # their 1x1 projections, next to 3x3 layers of the same key
    x = random_sparse(3, 1, 3, seed=22)
    a = spconv.SubMConv3d(3, 3, 1, indice_key="blk").double()
    b = spconv.SubMConv3d(3, 3, 3, indice_key="blk").double()
    assert "blk" not in a(x).indice_dict
    h = b(x)
    z = b(a(h))  # 3x3, 1x1, 3x3 on one key: the second 3x3 reuses the first one's map
    assert z.indice_dict["blk"] is h.indice_dict["blk"]
    a0, b0 = spconv.SubMConv3d(3, 3, 1).double(), spconv.SubMConv3d(3, 3, 3).double()
    a0.load_state_dict(a.state_dict())
    b0.load_state_dict(b.state_dict())
    torch.testing.assert_close(z.features, b0(a0(b0(x))).features)
    # a non-submanifold one tap on a submanifold key (a strided conv would need a key of its own)
    c = spconv.SparseConv3d(3, 3, 1, indice_key="blk").double()
    assert c(z).indices is z.indices


def test_one_tap_inverse_convolution():
    x = random_sparse(3, 2, 3, seed=23)
    # no map under the key: spconv's conv1x1, the input's sites
    up = spconv.SparseInverseConv3d(3, 4, 1, indice_key="none").double()
    assert up(x).indices is x.indices
    # after a strided one-tap conv: restores that conv's input sites (spconv would keep the strided ones)
    down = spconv.SparseConv3d(3, 3, 1, 2, indice_key="d").double()
    up = spconv.SparseInverseConv3d(3, 4, 1, indice_key="d").double()
    y = down(x)
    z = up(y)
    assert torch.equal(z.indices, x.indices)
    even = (x.indices[:, 1:] % 2 == 0).all(1)  # the sites the stride kept feed themselves back
    w = up.weight.reshape(4, 3)
    want = torch.zeros(x.indices.shape[0], 4, dtype=torch.float64)
    keys = {tuple(r): i for i, r in enumerate(y.indices.tolist())}
    for i, site in enumerate(x.indices.tolist()):
        if even[i]:
            want[i] = y.features[keys[(site[0], *[c // 2 for c in site[1:]])]] @ w.t()
    torch.testing.assert_close(z.features, want + up.bias)


def test_one_tap_gradients_to_second_order():
    x = random_sparse(2, 1, 2, density=0.5, seed=24)
    conv = spconv.SparseConv2d(2, 3, 1).double()

    def fn(f, w, b):
        return torch.func.functional_call(conv, {"weight": w, "bias": b}, (x.replace_feature(f),)).features

    args = (x.features.clone().requires_grad_(), conv.weight.detach().clone().requires_grad_(),
            conv.bias.detach().clone().requires_grad_())
    torch.autograd.gradcheck(fn, args)
    torch.autograd.gradgradcheck(fn, args)


def test_add_input_is_added_before_the_activation():
    from pointconv.sparse.conv import SparseConvolution

    x = random_sparse(3, 2, 3, seed=25)
    conv = SparseConvolution(3, 3, 4, 3, subm=True, act_type="ReLU").double()
    skip = x.replace_feature(torch.randn(x.features.shape[0], 4, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(1)))
    plain = spconv.SubMConv3d(3, 4, 3).double()
    plain.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x, skip).features, torch.relu(plain(x).features + skip.features))
    # a strided conv: add_input must be on its output sites
    down = spconv.SparseConv3d(3, 4, 3, 2, 1).double()
    y = down(x)
    torch.testing.assert_close(down(x, y).features, 2 * y.features)
    with pytest.raises(ValueError, match="add_input must have the output's sites"):
        down(x, skip)
    with pytest.raises(ValueError, match="add_input has 3 channels, the output 4"):
        conv(x, x)
    with pytest.raises(TypeError, match="add_input must be a SparseConvTensor"):
        conv(x, skip.features)


def test_spconv_helpers_and_attributes():
    from pointconv.sparse import functional, modules, pool

    x = random_sparse(3, 1, 3, seed=26)
    conv, pooling = spconv.SubMConv3d(3, 3, 3), spconv.SparseMaxPool3d(2)
    assert modules.is_spconv_module(conv) and modules.is_spconv_module(spconv.SparseReLU())
    assert not modules.is_spconv_module(nn.ReLU())
    assert modules.is_sparse_conv(conv) and not modules.is_sparse_conv(pooling)
    assert isinstance(pooling, pool.SparseMaxPool) and not isinstance(spconv.SparseAvgPool3d(2), pool.SparseMaxPool)
    # the bases take spconv's arguments and defaults: stride 1 (the Nd classes: the kernel size), subm 7th
    base = pool.SparseAvgPool(3, 2, None, 0, 1, None, False)
    assert pool.SparseMaxPool(3, 2).stride == (1, 1, 1) and base.stride == (2, 2, 2) and not base.subm
    assert type(base(x)) is spconv.SparseConvTensor
    assert conv._sparse_unique_name == "" and conv.fp32_accum is None
    assert not conv.is_inverseable() and spconv.SparseConv3d(3, 3, 3, 2, indice_key="d").is_inverseable()
    assert not spconv.SparseConv3d(3, 3, 3, 2).is_inverseable()
    assert x.is_quantized is False
    y = functional.sparse_add_hash_based(x, x)
    torch.testing.assert_close(y.features, functional.sparse_add(x, x).features)


@pytest.mark.parametrize("k,d", [(3, 1), (3, 2), (5, 1)])
def test_submanifold_pools_at_the_input_sites(k, d):
    # spconv's SparseMaxPool(ndim, ..., subm=True): the window centered on each input site, over its
    # active inputs; the input's sites in their order
    from pointconv.sparse import pool

    x = random_sparse(3, 2, 3, seed=27 + k + d)
    at = tuple(x.indices.long().unbind(1))
    active = site_mask(x)[:, None].double()
    for cls in (pool.SparseMaxPool, pool.SparseAvgPool):
        y = cls(3, k, dilation=d, subm=True)(x)
        assert y.indices is x.indices and y.spatial_shape == x.spatial_shape
        dense = x.dense()
        if cls is pool.SparseMaxPool:
            filled = torch.where(active.bool(), dense, torch.full_like(dense, float("-inf")))
            r = k // 2 * d  # (max_pool3d refuses padding past half the kernel: pad by hand)
            ref = F.max_pool3d(F.pad(filled, [r] * 6, value=float("-inf")), k, 1, 0, d)
        else:
            ones = torch.ones(1, 1, k, k, k, dtype=torch.float64)
            sums = F.conv3d(dense.flatten(0, 1)[:, None], ones, padding=k // 2 * d, dilation=d).view(dense.shape)
            ref = sums / F.conv3d(active, ones, padding=k // 2 * d, dilation=d)
        torch.testing.assert_close(y.features, ref.movedim(1, -1)[at])
    with pytest.raises(ValueError, match="a submanifold pool has stride 1"):
        pool.SparseMaxPool(3, 3, 2, subm=True)


def test_spconv_submodule_paths():
    # ported code imports from spconv's submodules: `from spconv.pytorch.tables import AddTable`
    from pointconv.sparse import core, identity, modules, ops, tables

    assert core.SparseConvTensor is spconv.SparseConvTensor and identity.Identity is spconv.Identity
    assert tables.AddTable is spconv.AddTable and tables.JoinTable is spconv.JoinTable
    assert ops.ConvAlgo is spconv.ConvAlgo and tables.AddTableMisaligned is modules.AddTableMisaligned
    # AddTableMisaligned sums tensors with different sites: against the sum of the dense grids
    a, b = random_sparse(3, 2, 3, seed=30), random_sparse(3, 2, 3, seed=31)
    y = tables.AddTableMisaligned()([a, b])
    torch.testing.assert_close(y.dense(), a.dense() + b.dense())
    assert torch.equal(site_mask(y), site_mask(a) | site_mask(b))
    with pytest.raises(ValueError, match="list of SparseConvTensors"):
        tables.AddTableMisaligned()(a)


def test_spconv_core_helpers():
    from pointconv.sparse import core

    assert core.expand_nd(3, 2) == [2, 2, 2] and core.expand_nd(2, (1, 4)) == [1, 4]
    assert core.expand_nd(2, torch.tensor([3, 5]).numpy()) == [3, 5]
    with pytest.raises(ValueError, match="3 ints"):
        core.expand_nd(3, [1, 2])
    with pytest.raises(TypeError):
        core.expand_nd(2, 1.5)
    indices = torch.tensor([[0, 2], [1, 0], [0, 1]])
    updates = torch.arange(6.0).view(3, 2)
    out = core.scatter_nd(indices, updates, [2, 3, 2])
    ref = torch.zeros(2, 3, 2)
    for (i, j), u in zip(indices.tolist(), updates):
        ref[i, j] = u
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="twice"):
        core.scatter_nd(indices[[0, 0]], updates[:2], [2, 3, 2])
    with pytest.raises(ValueError, match="outside"):
        core.scatter_nd(torch.tensor([[2, 0]]), updates[:1], [2, 3, 2])
    with pytest.raises(ValueError, match="updates must have shape"):
        core.scatter_nd(indices, updates[:, :1], [2, 3, 2])
    with pytest.raises(TypeError, match="indices must be an int64"):
        core.scatter_nd(indices.float(), updates, [2, 3, 2])  # (a cast would truncate 0.7 to 0)
    with pytest.raises(TypeError, match="updates must be a torch.Tensor"):
        core.scatter_nd(indices, updates.tolist(), [2, 3, 2])


@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), (3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 0, 2), (5, 3, 2, 1)])
def test_spconv_output_size_formulas(k, s, p, d):
    # the formulas say what the layers build: the dense output shapes of torch's convolutions
    from pointconv.sparse import ops

    x = random_sparse(2, 1, 2, seed=k + s + p + d)
    shape = x.spatial_shape
    conv = spconv.SparseConv2d(2, 2, k, s, p, d).double()
    assert ops.get_conv_output_size(shape, [k] * 2, [s] * 2, [p] * 2, [d] * 2) == conv(x).spatial_shape
    tconv = spconv.SparseConvTranspose2d(2, 2, k, s, p, d).double()
    assert ops.get_deconv_output_size(shape, [k] * 2, [s] * 2, [p] * 2, [d] * 2, [0, 0]) == tconv(x).spatial_shape
    # spconv's kernel size -1 spans the whole axis: one output
    assert ops.get_conv_output_size([7, 9], [-1, k], [1, s], [0, p], [1, d])[0] == 1
    with pytest.raises(ValueError, match="output spatial shape"):
        ops.get_conv_output_size([2, 2], [5, 5], [1, 1], [0, 0], [1, 1])
    # a per-axis list of the wrong length would drop axes (zip stops at the shortest)
    with pytest.raises(ValueError, match="kernel_size must have one value per axis"):
        ops.get_conv_output_size([7, 9, 4], [3, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="output_padding must have one value per axis"):
        ops.get_deconv_output_size([7, 9], [3, 3], [1, 1], [0, 0], [1, 1], [0])
