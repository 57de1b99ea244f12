"""pointconv.sparse on bad input: clear ValueError / TypeError naming the argument, never a wrap,
a merge of distinct sites or a silent truncation; empty tensors keep the right widths."""
import numpy as np
import pytest
import torch
from torch import nn

import pointconv.sparse as spconv


def sct(feats, idx, shape, batch_size=1):
    return spconv.SparseConvTensor(torch.as_tensor(feats, dtype=torch.float32),
                                   torch.tensor(idx, dtype=torch.int32), shape, batch_size)


# -- int32 output coordinates and int64 site keys -------------------------------------------------

def test_transposed_output_beyond_int32_raises():
    x = sct([[1.0]], [[0, 2**30, 0, 0]], [2**30 + 1, 1, 1])
    with pytest.raises(ValueError, match="int32"):  # the site would be at 2**32, wrapping to 0
        spconv.SparseConvTranspose3d(1, 1, 1, stride=4)(x)
    x = sct([[1.0]], [[0, 5, 0, 0]], [2**21, 1, 1])
    with pytest.raises(ValueError, match="int32"):
        spconv.SparseConv3d(1, 1, 1, padding=10**12)(x)


def test_transposed_output_at_the_int32_limit_is_exact():
    n = 2**29
    x = sct([[2.0]], [[0, n, 0, 0]], [n + 1, 1, 1])
    conv = spconv.SparseConvTranspose3d(1, 1, 1, stride=3, bias=False)
    y = conv(x)
    assert y.indices.tolist() == [[0, 3 * n, 0, 0]] and y.spatial_shape == [3 * n + 1, 1, 1]
    torch.testing.assert_close(y.features, 2 * conv.weight.reshape(1, 1))


def test_spatial_shape_beyond_int32_raises():
    with pytest.raises(ValueError, match="spatial_shape"):
        sct([[1.0]], [[0, 0, 0, 0]], [2**31 - 1, 2**32, 2**32])


def test_key_space_beyond_int64_raises_instead_of_merging_sites():
    shape = [2**31 - 1] * 3
    a = sct([[1.0]], [[0, 0, 0, 0]], shape, 2)
    b = sct([[1.0]], [[1, 1, 0, 0]], shape, 2)
    with pytest.raises(ValueError, match="int64 site keys"):
        spconv.functional.sparse_add(a, b)
    x = sct([[1.0], [2.0]], [[0, 0, 0, 0], [1, 0, 0, 0]], [2**21] * 3, 2)  # 2 x 2**63 cells
    for layer in (spconv.SparseConv3d(1, 1, 2, 2), spconv.SparseMaxPool3d(2), spconv.SubMConv3d(1, 1, 3)):
        with pytest.raises(ValueError, match="int64 site keys"):
            layer(x)
    # one-tap layers that leave the sites in place (spconv's conv1x1) need no keys
    assert spconv.SparseConv3d(1, 1, 1)(x).indices is x.indices
    assert spconv.SparseMaxPool3d(1)(x).indices is x.indices
    # a submanifold map pads the grid by its reach: the padded grid alone passes 2**63 cells
    x = sct([[1.0], [2.0]], [[0, 5, 5, 5], [0, 7, 7, 7]], [2**31 - 1] * 3)
    with pytest.raises(ValueError, match="int64 site keys"):
        spconv.SubMConv3d(1, 1, 3, dilation=4)(x)


def test_large_grid_within_int64_keys_is_exact():
    # one sample of 2**62 cells: the keys fit; output sites sorted, not wrapped
    x = sct([[1.0], [2.0]], [[0, 2**21 - 1, 7, 0], [0, 3, 2**20, 5]], [2**21, 2**21, 2**20])
    y = spconv.SparseMaxPool3d(1, stride=1, padding=1)(x)  # (padding: sites move, outputs are sorted)
    assert y.spatial_shape == [2**21 + 2, 2**21 + 2, 2**20 + 2]
    assert y.indices.tolist() == [[0, 4, 2**20 + 1, 6], [0, 2**21, 8, 1]]
    assert y.features.flatten().tolist() == [2.0, 1.0]
    s = spconv.functional.sparse_add(x, x)
    assert s.indices.tolist() == [[0, 3, 2**20, 5], [0, 2**21 - 1, 7, 0]]
    assert s.features.flatten().tolist() == [4.0, 2.0]


# -- PointToVoxel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vsize,rng", [([float("nan"), 0.1, 0.1], [0, 0, 0, 1, 1, 1]),
                                       ([float("inf"), 0.1, 0.1], [0, 0, 0, 1, 1, 1]),
                                       ([0.1] * 3, [0, 0, 0, 1, 1, float("inf")]),
                                       ([0.1] * 3, [float("nan"), 0, 0, 1, 1, 1])])
def test_point_to_voxel_rejects_non_finite(vsize, rng):
    with pytest.raises(ValueError, match="finite"):
        spconv.utils.PointToVoxel(vsize, rng, 4, 10, 5)


def test_point_to_voxel_rejects_grids_beyond_its_keys():
    # 1e7 voxels per axis: 1e21 cells, more than int64 keys (the ZYX indices came out negative)
    with pytest.raises(ValueError, match="too small"):
        spconv.utils.PointToVoxel([1e-7] * 3, [0, 0, 0, 1, 1, 1], 4, 1000, 5)
    with pytest.raises(ValueError, match="too small"):  # 1e10 voxels on one axis: beyond int32
        spconv.utils.PointToVoxel([1e-10, 1, 1], [0, 0, 0, 1, 1, 1], 4, 1000, 5)
    with pytest.raises(TypeError, match="vsize_xyz"):
        spconv.utils.PointToVoxel(["a", 1, 1], [0, 0, 0, 1, 1, 1], 4, 1000, 5)


def test_point_to_voxel_fine_grid_is_exact():
    g = spconv.utils.PointToVoxel([2.0**-16] * 3, [0, 0, 0, 1, 1, 1], 4, 1000, 5)  # 2**48 cells
    pc = torch.tensor([[0.25, 0.5, 0.75 + 2.0**-17, 1.0], [2.0, 0.5, 0.5, 1.0], [float("nan"), 0, 0, 1],
                       [1e300, 0, 0, 1]], dtype=torch.float64)
    voxels, idx, num = g(pc)
    assert idx.tolist() == [[49152, 32768, 16384]] and num.tolist() == [1]  # ZYX
    assert torch.equal(voxels[0, 0], pc[0])


# -- empty tensors through SparseSequential --------------------------------------------------------

def test_sequential_applies_plain_modules_to_empty_tensors():
    e = spconv.SparseConvTensor(torch.zeros(0, 2), torch.zeros(0, 4, dtype=torch.int32), [4, 4, 4], 1)
    assert spconv.SparseSequential(nn.Linear(2, 5))(e).features.shape == (0, 5)
    seq = spconv.SparseSequential(spconv.SubMConv3d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 7))
    y = seq(e)
    assert y.features.shape == (0, 7) and y.indices.shape == (0, 4)
    assert int(seq[1].num_batches_tracked) == 0  # a training batch norm does not count the empty batch
    seq.eval()
    assert seq(e).features.shape == (0, 7)
    x = sct([[1.0, -2.0]], [[0, 1, 1, 1]], [4, 4, 4])
    lin = nn.Linear(2, 5)
    torch.testing.assert_close(spconv.SparseSequential(lin)(x).features, lin(x.features))


# -- duplicate sites -------------------------------------------------------------------------------

def test_duplicate_sites_raise_in_dense_and_global_pools():
    d = sct([[1.0], [2.0]], [[0, 1, 0, 0], [0, 1, 0, 0]], [2, 2, 2])
    for f in (lambda: d.dense(), lambda: spconv.SparseGlobalAvgPool()(d), lambda: spconv.SparseGlobalMaxPool()(d)):
        with pytest.raises(ValueError, match="duplicate"):
            f()
    ok = sct([[1.0], [2.0]], [[0, 1, 0, 0], [1, 1, 0, 0]], [2, 2, 2], 2)
    assert ok.dense().sum().item() == 3.0
    assert spconv.SparseGlobalAvgPool()(ok).flatten().tolist() == [1.0, 2.0]


# -- integer parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"kernel_size": 2.5}, {"kernel_size": "3"}, {"kernel_size": True},
                                    {"stride": 1.5}, {"padding": [0, 0.5, 0]}, {"dilation": 1.0}])
def test_non_integer_layer_parameters_raise(kwargs):
    args = {"kernel_size": 3, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=name):
        spconv.SparseConv3d(1, 1, **args)
    with pytest.raises(TypeError, match=name):
        spconv.SparseMaxPool3d(**args)


def test_integer_like_layer_parameters_are_accepted():
    conv = spconv.SparseConv3d(1, 1, np.int64(3), stride=[1, np.int32(2), 1], padding=(0, 1, 0))
    assert conv.kernel_size == (3, 3, 3) and conv.stride == (1, 2, 1) and conv.padding == (0, 1, 0)
    assert all(type(v) is int for v in conv.kernel_size + conv.stride)


@pytest.mark.parametrize("op,stride,dilation", [(-1, 2, 1), (2, 2, 1), (1, 1, 1), (3, 2, 3)])
def test_transposed_output_padding_follows_torch(op, stride, dilation):
    with pytest.raises(ValueError, match="output_padding"):
        spconv.SparseConvTranspose3d(1, 1, 3, stride=stride, dilation=dilation, output_padding=op)
    with pytest.raises(RuntimeError):  # torch rejects the same
        nn.ConvTranspose3d(1, 1, 3, stride=stride, dilation=dilation, output_padding=op)(torch.zeros(1, 1, 2, 2, 2))


def test_transposed_output_padding_below_dilation_is_accepted():
    x = sct([[1.0]], [[0, 0, 0, 0]], [2, 2, 2])
    y = spconv.SparseConvTranspose3d(1, 1, 3, stride=1, dilation=2, output_padding=1)(x)
    ref = nn.ConvTranspose3d(1, 1, 3, stride=1, dilation=2, output_padding=1)(torch.zeros(1, 1, 2, 2, 2))
    assert y.spatial_shape == list(ref.shape[2:])


@pytest.mark.parametrize("bs,exc", [(1.7, TypeError), ("2", TypeError), (True, TypeError), (0, ValueError)])
def test_batch_size_must_be_an_int(bs, exc):
    with pytest.raises(exc, match="batch_size"):
        sct([[1.0]], [[0, 0, 0, 0]], [4, 4, 4], bs)


def test_batch_size_accepts_integer_scalars():
    assert sct([[1.0]], [[0, 0, 0, 0]], [4, 4, 4], np.int64(2)).batch_size == 2
    assert sct([[1.0]], [[0, 0, 0, 0]], [4, 4, 4], torch.tensor(3)).batch_size == 3


def test_hash_table_items_and_arguments():
    table = spconv.HashTable("cpu", torch.int64, torch.int64)
    table.insert(torch.tensor([9, 3, 5]), torch.tensor([90, 30, 50]))
    for max_size in (-1, None):  # spconv's default -1: every key
        keys, values, count = table.items(max_size)
        assert keys.tolist() == [3, 5, 9] and values.tolist() == [30, 50, 90] and count.tolist() == [3]
    assert table.items()[0].tolist() == [3, 5, 9]
    assert table.items(2)[0].tolist() == [3, 5]
    with pytest.raises(TypeError, match="max_size"):
        table.items(1.5)
    with pytest.raises(ValueError, match="device"):
        spconv.HashTable("gpu", torch.int64, torch.int64)
    with pytest.raises(TypeError, match="value_dtype"):
        spconv.HashTable("cpu", torch.int64, "int64")
    with pytest.raises(ValueError, match="shape"):
        table.query(torch.tensor([3, 4, 9]), torch.zeros(2, dtype=torch.int64))
    out = torch.full((3,), -7, dtype=torch.int64)
    values, empty = table.query(torch.tensor([3, 4, 9]), out)
    assert out.tolist() == [30, 0, 90] and values.tolist() == [30, 0, 90] and empty.tolist() == [False, True, False]


def test_gather_features_by_pc_voxel_id_ids_and_invalid_value():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    with pytest.raises(ValueError, match="pc_voxel_id"):
        spconv.utils.gather_features_by_pc_voxel_id(f, torch.tensor([-2]))
    with pytest.raises(ValueError, match="pc_voxel_id"):
        spconv.utils.gather_features_by_pc_voxel_id(f, torch.tensor([3]))
    with pytest.raises(ValueError, match="invalid_value"):
        spconv.utils.gather_features_by_pc_voxel_id(f, torch.tensor([-1]), invalid_value=torch.rand(5))
    with pytest.raises(TypeError, match="invalid_value"):
        spconv.utils.gather_features_by_pc_voxel_id(f, torch.tensor([-1]), invalid_value="x")
    out = spconv.utils.gather_features_by_pc_voxel_id(f, torch.tensor([2, -1, 0]), invalid_value=-1.5)
    assert out.tolist() == [[5.0, 6.0], [-1.5, -1.5], [1.0, 2.0]]
    out = spconv.utils.gather_features_by_pc_voxel_id(f, torch.tensor([-1, 1]), torch.tensor([7.0, 8.0]))
    assert out.tolist() == [[7.0, 8.0], [3.0, 4.0]]


# -- exception types -------------------------------------------------------------------------------

def test_feature_replacement_and_sums_raise_clear_errors():
    x = sct([[1.0, 2.0], [3.0, 4.0]], [[0, 0, 0, 0], [0, 1, 0, 0]], [4, 4, 4])
    with pytest.raises(TypeError, match="feature"):
        x.replace_feature([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="features"):
        x.features = [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="features"):
        x.features = torch.zeros(2)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        x + torch.rand(3, 2)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        x + torch.rand(2, 3)
    with pytest.raises(ValueError, match="channels"):
        x + x.replace_feature(torch.rand(2, 3))
    assert (x + torch.tensor([10.0, 20.0])).features.tolist() == [[11.0, 22.0], [13.0, 24.0]]  # broadcasts
    assert (torch.ones(2, 2) + x).features.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    y = x.shadow_copy()
    y += x
    assert y.features.tolist() == [[2.0, 4.0], [6.0, 8.0]]
    with pytest.raises(ValueError, match="already"):
        spconv.SparseSequential(nn.ReLU()).add(nn.ReLU(), "0")


def conv_half_ok(x):
    # float32 weights take fp16 / bf16 features (mixed precision, summed in float32)
    conv = spconv.SubMConv3d(2, 3, 3)
    return all(conv(x.replace_feature(x.features.to(dt))).features.dtype == dt for dt in (torch.float16, torch.bfloat16))


def test_features_must_have_the_layers_dtype():
    # the layer's weights were cast to the features' dtype: a float64 layer on float32 features
    # silently computed in float32 (torch's and spconv's convolutions raise)
    x = sct([[1.0, 2.0], [3.0, 4.0]], [[0, 0, 0, 0], [0, 1, 0, 0]], [3, 3, 3])
    assert conv_half_ok(x)
    for layer in (spconv.SubMConv3d(2, 3, 3).double(), spconv.SparseConv3d(2, 3, 2, 2).half(),
                  spconv.SparseInverseConv3d(2, 3, 2, indice_key="k").double()):
        with pytest.raises(TypeError, match=r"features has dtype torch.float32 but the layer's parameters"):
            layer(x)
    conv = spconv.SubMConv3d(2, 3, 3)
    with pytest.raises(TypeError, match="features has dtype torch.float64"):
        conv(x.replace_feature(x.features.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the dtype itself
        assert conv(x).features.dtype == torch.bfloat16
    assert conv.double()(x.replace_feature(x.features.double())).features.dtype == torch.float64
