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



# -- the API around the layers: same signatures, same outputs ------------------------------------------

def _positional(fn):
    import inspect
    return [n for n, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"]


@pytest.mark.parametrize("name", [name for name in (f"{kind}{n}d" for n in (1, 2, 3, 4) for kind in (
    "SubMConv", "SparseConv", "SparseConvTranspose", "SparseInverseConv", "SparseMaxPool", "SparseAvgPool"))
    if hasattr(spconv, name)])  # (spconv has no SparseAvgPool4d)
def test_constructor_arguments_in_spconvs_order(name):
    # a positional argument must land where spconv puts it (a late one shifted silently otherwise)
    theirs, mine = _positional(getattr(spconv, name).__init__), _positional(getattr(ours, name).__init__)
    assert mine[:len(theirs)] == theirs


def test_sparse_conv_tensor_has_spconvs_public_attributes():
    """Code that reads spconv's attributes (``benchmark_record`` after ``benchmark=True``, say)
    finds each public one spconv's tensor has, apart from its kernel timer."""
    idx = torch.tensor([[0, 1, 2], [0, 3, 1]], dtype=torch.int32)
    theirs = spconv.SparseConvTensor(torch.ones(2, 3), idx, [4, 4], 1, benchmark=True)
    mine = ours.SparseConvTensor(torch.ones(2, 3), idx, [4, 4], 1, benchmark=True)
    public = {n for n in vars(theirs) if not n.startswith("_")}
    assert public <= set(vars(mine)) | {"features"} and mine.benchmark_record == {}
    assert _positional(ours.SparseConvTensor.__init__)[:len(_positional(spconv.SparseConvTensor.__init__))] == \
        _positional(spconv.SparseConvTensor.__init__)


def test_utility_arguments_in_spconvs_order():
    from spconv.pytorch import utils as their_utils
    from spconv.pytorch.hash import HashTable as TheirTable
    for fn in ("__call__", "generate_voxel_with_id"):
        theirs = _positional(getattr(their_utils.PointToVoxel, fn))
        assert _positional(getattr(ours.utils.PointToVoxel, fn))[:len(theirs)] == theirs
    theirs = _positional(their_utils.gather_features_by_pc_voxel_id)
    assert _positional(ours.utils.gather_features_by_pc_voxel_id) == theirs
    for fn in ("insert", "query", "insert_exist_keys", "items"):
        theirs = _positional(getattr(TheirTable, fn))
        assert _positional(getattr(ours.hash.HashTable, fn))[:len(theirs)] == theirs


@pytest.mark.parametrize("D", [1, 2, 3, 4])
@pytest.mark.parametrize("on_faces", [False, True])
def test_point_to_voxel_parity_in_1_to_4_dimensions(D, on_faces):
    """Random points, and points on voxel faces (multiples of 0.1 with 0.1 / 0.2 / 0.3 voxels:
    spconv floors the float32 quotient, so the float64 one put most of them one voxel lower)."""
    from spconv.pytorch.utils import PointToVoxel as TheirVoxelizer
    g = torch.Generator().manual_seed(D)
    pc = torch.cat([torch.rand(400, D, generator=g) * 2.2 - 0.1, torch.randn(400, 2, generator=g)], 1)
    args = ([0.5, 0.25, 0.5, 1.0][:D], [0] * D + [2] * D, D + 2, 30, 3)
    if on_faces:
        pc[:, :D] = torch.round(pc[:, :D] * 10) / 10
        args = ([0.1, 0.2, 0.3, 0.1][:D], [0] * D + [2.1] * D, D + 2, 400, 3)
    v_t, i_t, n_t, id_t = TheirVoxelizer(*args).generate_voxel_with_id(pc, True, False)
    v_m, i_m, n_m, id_m = ours.utils.PointToVoxel(*args).generate_voxel_with_id(pc, True, False)
    # the same voxels (spconv's come in hash order, ours sorted), points and per-point voxel ids
    order = {tuple(r): j for j, r in enumerate(i_t.tolist())}
    assert sorted(order) == [tuple(r) for r in i_m.tolist()]
    perm = torch.tensor([order[tuple(r)] for r in i_m.tolist()])
    assert torch.equal(n_m, n_t[perm]) and torch.equal(v_m, v_t[perm])
    theirs_as_ours = torch.full((len(i_t),), -1).index_copy_(0, perm, torch.arange(len(i_m)))
    assert torch.equal(id_m, torch.where(id_t >= 0, theirs_as_ours[id_t.clamp(min=0)], -1))


@pytest.mark.parametrize("args", [([0.1, 0.2, 0.4], [0, 0, 0, 3.2, 8, 4]), ([0.3], [1, 5]),
                                  ([0.05, 0.05, 0.1], [-10, -20, -3, 10, 20, 1]),
                                  ([0.1, 0.2, 0.3, 0.5], [0, 0, 0, 0, 1, 1, 1, 1])])
def test_point_to_voxel_attributes_are_spconvs(args):
    # z, y, x lists: code that builds its spatial_shape from grid_size got the axes reversed
    from spconv.pytorch.utils import PointToVoxel as TheirVoxelizer
    mine, theirs = ours.utils.PointToVoxel(*args, 5, 100, 5), TheirVoxelizer(*args, 5, 100, 5)
    for name in ("vsize", "grid_size", "grid_stride", "coors_range"):
        assert getattr(mine, name) == getattr(theirs, name), name


def test_gather_features_by_pc_voxel_id_parity():
    from spconv.pytorch.utils import gather_features_by_pc_voxel_id as theirs
    pid = torch.tensor([2, -1, 0, 0, 1])
    for values in (torch.tensor([9, 3, 7]), torch.arange(12.0).view(3, 4), torch.arange(12.0).view(3, 2, 2)):
        assert torch.equal(ours.utils.gather_features_by_pc_voxel_id(values, pid, -5), theirs(values, pid, -5))


@pytest.mark.parametrize("cls", ["SparseConv3d", "SparseConvTranspose3d", "SparseMaxPool3d"])
def test_record_voxel_count_checkpoints_load(cls):
    a, b = _pair(seed=4)
    make = (lambda m: getattr(m, cls)(2, 2, record_voxel_count=True)) if "Pool" in cls else \
        (lambda m: getattr(m, cls)(4, 4, 3, 2, record_voxel_count=True))
    theirs, mine = make(spconv), make(ours)
    n_out = theirs(b).indices.shape[0]
    mine.load_state_dict(theirs.state_dict())  # the buffer max_num_voxels_during_training included
    assert int(mine.get_max_num_voxels()) == n_out == int(theirs.get_max_num_voxels())
    small = ours.SparseConvTensor(a.features[:5], a.indices[:5], a.spatial_shape, a.batch_size)
    mine(small)  # fewer sites: the count keeps the maximum
    assert int(mine.get_max_num_voxels()) == n_out
    mine.load_state_dict({k: v for k, v in theirs.state_dict().items() if "max_num_voxels" not in k})
    assert int(mine.get_max_num_voxels()) == 0  # as spconv: a checkpoint without the count loads
    assert getattr(ours, cls)(*([2] if "Pool" in cls else [4, 4, 3])).get_max_num_voxels() is None


@pytest.mark.parametrize("cls,args", [("SparseConv3d", (4, 4, 1)), ("SparseConvTranspose3d", (4, 4, 1)),
                                      ("SubMConv3d", (4, 4, 1)), ("SparseMaxPool3d", (1,))])
def test_one_tap_layers_keep_spconvs_site_order(cls, args):
    # spconv's conv1x1 (and its CPU pool of one tap) keeps the input's sites in their order: a
    # residual add after a 1x1 projection lines up only so. Identity weights: spconv's own 1x1
    # product reads the weight as (in, out), the dense math as (out, in) (README)
    a, b = _pair(seed=3)
    perm = torch.randperm(a.indices.shape[0], generator=torch.Generator().manual_seed(0))
    a = ours.SparseConvTensor(a.features[perm], a.indices[perm], a.spatial_shape, a.batch_size)
    b = spconv.SparseConvTensor(b.features[perm], b.indices[perm].contiguous(), b.spatial_shape, b.batch_size)
    mine, theirs = getattr(ours, cls)(*args), getattr(spconv, cls)(*args)
    if "Pool" not in cls:
        for m in (mine, theirs):
            with torch.no_grad():
                m.weight.copy_(torch.eye(4).view(4, 1, 1, 1, 4))
                m.bias.zero_()
    ya, yb = mine(a), theirs(b)
    assert torch.equal(ya.indices, yb.indices) and torch.equal(ya.indices, a.indices)
    # (spconv's CPU max pool clamps at 0: compare where the features are positive)
    keep = (b.features > 0) if "Pool" in cls else torch.ones_like(b.features, dtype=torch.bool)
    torch.testing.assert_close(ya.features[keep], yb.features[keep])


def test_add_input_parity():
    # spconv's add_input (its fused residual blocks pass it): conv(x) + bias + add_input.features
    a, b = _pair(seed=4)
    mine, theirs = ours.SubMConv3d(4, 4, 3), spconv.SubMConv3d(4, 4, 3)
    mine.load_state_dict(theirs.state_dict())
    theirs.train()  # (spconv's CPU wheel runs the bias in training mode only)
    torch.testing.assert_close(mine(a, a).features, theirs(b, b).features, rtol=1e-4, atol=1e-5)


# spconv's own scatter_nd indexes with a list (torch warns)
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")
def test_submodule_paths_and_formulas_match_spconv():
    # `import spconv.pytorch.X` -> `import pointconv.sparse.X` for the submodules ported code imports
    import importlib

    for name, names in {"core": ["SparseConvTensor", "expand_nd", "scatter_nd"], "identity": ["Identity"],
                        "tables": ["AddTable", "AddTableMisaligned", "ConcatTable", "JoinTable"],
                        "ops": ["ConvAlgo", "get_conv_output_size", "get_deconv_output_size"]}.items():
        theirs, mine = importlib.import_module(f"spconv.pytorch.{name}"), importlib.import_module(f"pointconv.sparse.{name}")
        assert all(hasattr(theirs, n) and hasattr(mine, n) for n in names), name
    from pointconv.sparse import core, ops
    from spconv.pytorch import core as score, ops as sops

    for args in [([10, 11, 7], [3, -1, 2], [2, 1, 1], [1, 0, 1], [1, 1, 2]), ([20, 5], [2, 3], [2, 2], [0, 1], [1, 1])]:
        assert ops.get_conv_output_size(*args) == sops.get_conv_output_size(*args)
    # spconv's transposed formula leaves dilation out: compare at dilation 1
    args = ([10, 11], [3, 2], [2, 1], [1, 0], [1, 1], [1, 0])
    assert ops.get_deconv_output_size(*args) == sops.get_deconv_output_size(*args)
    assert core.expand_nd(3, (1, 2, 3)) == score.expand_nd(3, (1, 2, 3)) and core.expand_nd(2, 4) == score.expand_nd(2, 4)
    indices, updates = torch.tensor([[0, 2], [1, 0]]), torch.randn(2, 5)
    assert torch.equal(core.scatter_nd(indices, updates, [2, 3, 5]), score.scatter_nd(indices, updates, [2, 3, 5]))
    # (spconv's AddTableMisaligned needs CUDA for its hash table: test_sparse_more checks ours against dense sums)
