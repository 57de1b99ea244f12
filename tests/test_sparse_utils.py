import pytest
import torch

import pointconv.sparse as spconv
from pointconv.sparse.utils import PointToVoxel, gather_features_by_pc_voxel_id


def naive_voxelize(pc, vsize, lo, grid, max_voxels, max_points):
    """Dictionary voxelizer with spconv's keep rules (first-appearance voxels, first points)."""
    voxels, order = {}, []
    ids = []
    for i, p in enumerate(pc.tolist()):
        c = [int(torch.floor(torch.tensor((p[a] - lo[a]) / vsize[a])).item()) for a in range(3)]
        if not all(0 <= c[a] < grid[a] for a in range(3)):
            ids.append(None)
            continue
        key = (c[2], c[1], c[0])
        if key not in voxels:
            if len(order) == max_voxels:
                ids.append(None)
                continue
            voxels[key] = []
            order.append(key)
        voxels[key].append(i)
        ids.append(key)
    return voxels, ids


@pytest.mark.parametrize("max_voxels,max_points", [(1000, 5), (7, 2)])
def test_point_to_voxel_matches_naive(max_voxels, max_points):
    g = torch.Generator().manual_seed(0)
    pc = torch.cat([torch.rand(300, 3, generator=g) * 2.4 - 0.2, torch.randn(300, 1, generator=g)], 1)
    gen = PointToVoxel([0.25, 0.5, 0.5], [0, 0, 0, 2, 2, 2], 4, max_voxels, max_points)
    voxels, idx, num, pid = gen.generate_voxel_with_id(pc)
    ref, ids = naive_voxelize(pc, [0.25, 0.5, 0.5], [0, 0, 0], [8, 4, 4], max_voxels, max_points)
    assert gen.spatial_shape == [4, 4, 8]
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


def test_gather_features_by_pc_voxel_id():
    seg = torch.arange(6.0).view(3, 2)
    pid = torch.tensor([2, -1, 0])
    out = gather_features_by_pc_voxel_id(seg, pid, invalid_value=-7)
    assert out.tolist() == [[4.0, 5.0], [-7.0, -7.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="must be < 3"):
        gather_features_by_pc_voxel_id(seg, torch.tensor([3]))


def test_point_to_voxel_bad_input():
    with pytest.raises(ValueError, match="vsize_xyz"):
        PointToVoxel([0, 1, 1], [0, 0, 0, 1, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match="coors_range_xyz"):
        PointToVoxel([1, 1, 1], [0, 0, 0, -1, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match="num_point_features counts x, y, z"):
        PointToVoxel([1, 1, 1], [0, 0, 0, 1, 1, 1], 2, 10, 2)
    gen = PointToVoxel([1, 1, 1], [0, 0, 0, 1, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match=r"pc must have shape \(N, 3\)"):
        gen(torch.zeros(5, 4))


@pytest.mark.parametrize("key_dtype", [torch.int32, torch.int64])
def test_hash_table(key_dtype):
    table = spconv.HashTable("cpu", key_dtype, torch.float32, max_size=10)
    table.insert(torch.tensor([5, 1, 9], dtype=key_dtype), torch.tensor([0.5, 0.1, 0.9]))
    table.insert(torch.tensor([1, 7], dtype=key_dtype), torch.tensor([1.1, 0.7]))  # 1 updated
    vals, empty = table.query(torch.tensor([1, 2, 9], dtype=key_dtype))
    assert vals.tolist() == pytest.approx([1.1, 0.0, 0.9]) and empty.tolist() == [False, True, False]
    ok = table.insert_exist_keys(torch.tensor([7, 8], dtype=key_dtype), torch.tensor([7.0, 8.0]))
    assert ok.tolist() == [True, False]
    keys, values, count = table.items()
    assert keys.tolist() == [1, 5, 7, 9] and values.tolist() == pytest.approx([1.1, 0.5, 7.0, 0.9])
    assert int(count[0]) == 4
    assert table.assign_arange_() == 4
    assert table.query(torch.tensor([9, 1], dtype=key_dtype))[0].tolist() == [3, 0]
    with pytest.raises(ValueError, match="more than max_size"):
        table.insert(torch.arange(20, dtype=key_dtype))
    with pytest.raises(TypeError, match="keys must be a 1-D"):
        table.query(torch.tensor([1.0]))


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
