import math

import numpy as np
import pytest
import torch

import pointconv.sparse as spconv
from pointconv.sparse.utils import PointToVoxel, gather_features_by_pc_voxel_id


def naive_voxelize(pc, vsize, lo, grid, max_voxels, max_points):
    """Dictionary voxelizer with spconv's keep rules (first-appearance voxels, first points); keys
    are the coordinates last axis first (z, y, x)."""
    D = len(vsize)
    voxels, order = {}, []
    ids = []
    for i, p in enumerate(pc.tolist()):
        # float32 arithmetic, as spconv's: (x - lo) / vsize, each step rounded to float32
        c = [math.floor(np.float32(np.float32(p[a]) - np.float32(lo[a])) / np.float32(vsize[a])) for a in range(D)]
        if not all(0 <= c[a] < grid[a] for a in range(D)):
            ids.append(None)
            continue
        key = tuple(c[::-1])
        if key not in voxels:
            if len(order) == max_voxels:
                ids.append(None)
                continue
            voxels[key] = []
            order.append(key)
        voxels[key].append(i)
        ids.append(key)
    return voxels, ids


@pytest.mark.parametrize("max_voxels,max_points,D", [(1000, 5, 3), (7, 2, 3), (1000, 3, 2), (40, 2, 4), (50, 4, 1)])
def test_point_to_voxel_matches_naive(max_voxels, max_points, D):
    g = torch.Generator().manual_seed(D)
    pc = torch.cat([torch.rand(300, D, generator=g) * 2.4 - 0.2, torch.randn(300, 1, generator=g)], 1)
    vsize = [0.25, 0.5, 0.5, 1.0][:D]
    gen = PointToVoxel(vsize, [0] * D + [2] * D, D + 1, max_voxels, max_points)
    voxels, idx, num, pid = gen.generate_voxel_with_id(pc)
    grid = [int(2 / v) for v in vsize]
    ref, ids = naive_voxelize(pc, vsize, [0] * D, grid, max_voxels, max_points)
    assert gen.spatial_shape == grid[::-1] and idx.shape == (len(ref), D)
    keys = [tuple(r) for r in idx.tolist()]
    assert keys == sorted(ref)  # kept voxels, sorted by (z, y, x)
    for v, key in enumerate(keys):
        members = ref[key]
        assert int(num[v]) == min(len(members), max_points)
        torch.testing.assert_close(voxels[v, : int(num[v])], pc[members[:max_points]])
        assert bool((voxels[v, int(num[v]):] == 0).all())
    expect_id = torch.tensor([-1 if k is None else keys.index(k) for k in ids])
    assert torch.equal(pid, expect_id)


def test_point_to_voxel_empty_mean_and_call():
    pc = torch.tensor([[0.1, 0.1, 0.1, 1.0], [0.2, 0.2, 0.2, 3.0], [1.5, 0.1, 0.1, 5.0]])
    gen = PointToVoxel([1, 1, 1], [0, 0, 0, 2, 2, 2], 4, 10, 3)
    voxels, idx, num = gen(pc, empty_mean=True)
    assert idx.tolist() == [[0, 0, 0], [0, 0, 1]] and num.tolist() == [2, 1]
    torch.testing.assert_close(voxels[0, 2], pc[:2].mean(0))
    torch.testing.assert_close(voxels[1, 1], pc[2])
    # spconv's order: (pc, clear_voxels, empty_mean); the voxels are new every call, so clearing is moot
    plain = gen(pc)[0]
    assert plain[0, 2].tolist() == [0.0] * 4 and torch.equal(plain[0, :2], voxels[0, :2])
    for args in [(pc, True), (pc, False), (pc, True, False)]:
        assert torch.equal(gen(*args)[0], plain)
    assert torch.equal(gen(pc, True, True)[0], voxels)
    assert torch.equal(gen.generate_voxel_with_id(pc, False, True)[0], voxels)


def test_gather_features_by_pc_voxel_id_any_trailing_shape():
    labels = torch.tensor([9, 3, 7])  # per-voxel labels (M,), as segmentation heads give
    pid = torch.tensor([0, -1, 2, 1, 1])
    assert gather_features_by_pc_voxel_id(labels, pid, -1).tolist() == [9, -1, 7, 3, 3]
    blocks = torch.arange(12.0).view(3, 2, 2)
    out = gather_features_by_pc_voxel_id(seg_res_features=blocks, pc_voxel_id=pid,
                                         invalid_value=torch.tensor([-1.0, -2.0]))
    assert out.shape == (5, 2, 2) and torch.equal(out[2], blocks[2])
    assert out[1].tolist() == [[-1.0, -2.0], [-1.0, -2.0]]
    with pytest.raises(ValueError, match="invalid_value"):
        gather_features_by_pc_voxel_id(blocks, pid, invalid_value=torch.zeros(3))
    with pytest.raises(ValueError, match="seg_res_features"):
        gather_features_by_pc_voxel_id(torch.tensor(1.0), pid)


def test_gather_features_by_pc_voxel_id():
    seg = torch.arange(6.0).view(3, 2)
    pid = torch.tensor([2, -1, 0])
    out = gather_features_by_pc_voxel_id(seg, pid, invalid_value=-7)
    assert out.tolist() == [[4.0, 5.0], [-7.0, -7.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="must be < 3"):
        gather_features_by_pc_voxel_id(seg, torch.tensor([3]))
    # integer labels take an invalid_value they hold exactly (torch's own error did not name it)
    labels = torch.tensor([4, 5, 6], dtype=torch.int32)
    assert gather_features_by_pc_voxel_id(labels, pid, invalid_value=-2**31).tolist() == [6, -2**31, 4]
    for bad in (2**40, 0.5, float("inf")):
        with pytest.raises(ValueError, match=r"invalid_value must be an integer in \[-2147483648, 2147483647\]"):
            gather_features_by_pc_voxel_id(labels, pid, invalid_value=bad)
    with pytest.raises(ValueError, match=r"invalid_value must be an integer in \[0, 1\]"):
        gather_features_by_pc_voxel_id(labels > 4, pid, invalid_value=2)


def test_point_to_voxel_bad_input():
    with pytest.raises(ValueError, match="vsize_xyz"):
        PointToVoxel([0, 1, 1], [0, 0, 0, 1, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match="coors_range_xyz"):
        PointToVoxel([1, 1, 1], [0, 0, 0, -1, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match="num_point_features counts the 3 coordinates"):
        PointToVoxel([1, 1, 1], [0, 0, 0, 1, 1, 1], 2, 10, 2)
    # sizes and ranges outside float32 (its arithmetic, spconv's) are named, not an OverflowError
    with pytest.raises(ValueError, match="vsize_xyz must be .* nonzero in float32"):
        PointToVoxel([1e-50] * 3, [0, 0, 0, 1, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match="coors_range_xyz must be 6 numbers finite in float32"):
        PointToVoxel([1, 1, 1], [0, 0, 0, 1e39, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match=r"too small .* \[inf, 1, 1\] voxels"):
        PointToVoxel([1, 1, 1], [-3e38, 0, 0, 3e38, 1, 1], 3, 10, 2)
    # a range under half a voxel along an axis rounds to no voxels there (spconv then drops every
    # point; a widened axis kept points outside the range)
    with pytest.raises(ValueError, match=r"spans less than half a voxel"):
        PointToVoxel([1, 1, 1], [0, 0, 0, 0.4, 1, 1], 3, 10, 2)
    gen = PointToVoxel([1, 1, 1], [0, 0, 0, 1, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match=r"pc must have shape \(N, 3\)"):
        gen(torch.zeros(5, 4))
    # flags are bools: the string "no" would read as True
    for kwargs in ({"empty_mean": "no"}, {"clear_voxels": "no"}):
        with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be a bool"):
            gen(torch.zeros(5, 3), **kwargs)
        with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be a bool"):
            gen.generate_voxel_with_id(torch.zeros(5, 3), **kwargs)


@pytest.mark.parametrize("key_dtype", [torch.int32, torch.int64])
def test_hash_table(key_dtype):
    table = spconv.HashTable("cpu", key_dtype, torch.float32, max_size=10)
    table.insert(torch.tensor([5, 1, 9], dtype=key_dtype), torch.tensor([0.5, 0.1, 0.9]))
    table.insert(torch.tensor([1, 7], dtype=key_dtype), torch.tensor([1.1, 0.7]))  # 1 updated
    vals, empty = table.query(torch.tensor([1, 2, 9], dtype=key_dtype))
    assert vals.tolist() == pytest.approx([1.1, 0.0, 0.9]) and empty.tolist() == [False, True, False]
    # spconv's is_empty: uint8, 1 where the key was absent and nothing was inserted
    is_empty = table.insert_exist_keys(torch.tensor([7, 8], dtype=key_dtype), torch.tensor([7.0, 8.0]))
    assert is_empty.dtype == torch.uint8 and is_empty.tolist() == [0, 1]
    keys, values, count = table.items()
    assert keys.tolist() == [1, 5, 7, 9] and values.tolist() == pytest.approx([1.1, 0.5, 7.0, 0.9])
    # spconv's count: a (1,) tensor, int64 on CPU (its own sparse_add_hash_based calls .item() on it)
    assert count.dtype == torch.int64 and count.tolist() == [4]
    count = table.assign_arange_()
    assert count.dtype == torch.int64 and count.item() == 4
    assert table.query(torch.tensor([9, 1], dtype=key_dtype))[0].tolist() == [3, 0]
    with pytest.raises(ValueError, match="more than max_size"):
        table.insert(torch.arange(20, dtype=key_dtype))
    with pytest.raises(TypeError, match="keys must be a 1-D"):
        table.query(torch.tensor([1.0]))


def test_hash_table_rows_keep_one_shape():
    """Values are one row per key, every row shaped as the table's first ones: a 0-dim value, or
    rows of another shape, are named (they raised IndexError / errors from inside torch.cat)."""
    table = spconv.HashTable("cpu", torch.int64, torch.float32)
    with pytest.raises(ValueError, match=r"values must have one row per key, shape \(1, ...\), got shape \(\)"):
        table.insert(torch.tensor([1]), torch.tensor(1.0))
    # a key absent from an empty table: nothing to update, whatever the rows' shape
    assert table.insert_exist_keys(torch.tensor([4]), torch.ones(1, 3)).tolist() == [1]
    table.insert(torch.tensor([1, 2]), torch.arange(6.0).view(2, 3))
    table.insert(torch.tensor([3]))  # no values: zero rows of the table's shape
    keys, values, _ = table.items()
    assert keys.tolist() == [1, 2, 3] and values.tolist() == [[0, 1, 2], [3, 4, 5], [0, 0, 0]]
    for call in (lambda: table.insert(torch.tensor([4]), torch.ones(1)),
                 lambda: table.insert_exist_keys(torch.tensor([1]), torch.ones(1, 4))):
        with pytest.raises(ValueError, match=r"values must have shape \(1, 3\): rows shaped as the table's"):
            call()
    assert table.insert_exist_keys(torch.tensor([2, 9]), torch.full((2, 3), 7.0)).tolist() == [0, 1]
    assert table.query(torch.tensor([2]))[0].tolist() == [[7.0, 7.0, 7.0]]


def test_voxels_feed_a_sparse_network():
    g = torch.Generator().manual_seed(1)
    pc = torch.rand(2000, 4, generator=g)
    gen = PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1], 4, 5000, 8)
    voxels, idx, num, pid = gen.generate_voxel_with_id(pc)
    feats = voxels.sum(1) / num[:, None].float()
    batch_idx = torch.cat([torch.zeros(len(idx), 1, dtype=torch.int32), idx], 1)
    x = spconv.SparseConvTensor(feats, batch_idx, gen.spatial_shape, 1)
    y = spconv.SubMConv3d(4, 6, 3)(x)
    per_point = gather_features_by_pc_voxel_id(y.features, pid)
    assert per_point.shape == (2000, 6)
    torch.testing.assert_close(per_point[5], y.features[pid[5]])


def test_point_to_voxel_attributes_in_spconvs_zyx_order():
    gen = spconv.utils.PointToVoxel([0.1, 0.2, 0.4], [0, 0, 0, 3.2, 8, 4], 4, 100, 5)
    assert gen.grid_size == gen.spatial_shape == [10, 40, 32]  # z, y, x
    assert gen.grid_stride == [40 * 32, 32, 1]
    f32 = [float(torch.tensor(v, dtype=torch.float32)) for v in (0.4, 0.2, 0.1, 3.2)]
    assert gen.vsize == f32[:3] and gen.coors_range == [0.0, 0.0, 0.0, 4.0, 8.0, f32[3]]
