"""Every differentiable op on CPU gives the same bits run after run WITHOUT deterministic mode.

On CPU torch's accumulating ``index_put_`` (the backward of indexing with a tensor) adds on threads,
in an order that changes from run to run; the ops must sum repeated rows with ``index_add_``
(sequential) or their own fixed-order code instead. The gather, grid_subsample and Gaussian
aggregation cases, whose earlier code did not, are in their own test files.
"""
import pytest
import torch

import pointconv
import pointconv.sparse as spconv

B, N = 2, 6000


def _cloud():
    g = torch.Generator().manual_seed(0)
    return torch.rand(B, N, 3, generator=g), torch.randn(B, N, 16, generator=g)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _point_ops():
    pts, feats = _cloud()
    idx = pointconv.knn(pts, pts, 16, exclude_self=True).idx
    weights = torch.rand(B, N, 16, generator=torch.Generator().manual_seed(1))

    def aggregate(reduce):
        def run():
            f, w = _leaves(feats, weights)
            y = pointconv.aggregate(f, idx, reduce, weights=w if reduce == "weighted" else None)
            return y, [f, w] if reduce == "weighted" else [f]
        return run

    def adjacency():
        (f,) = _leaves(feats)
        return torch.sparse.mm(pointconv.adjacency(idx, N), f.reshape(-1, 16)), [f]

    def module(make, call):
        def run():
            torch.manual_seed(3)
            m = make()
            f, p = _leaves(feats, pts)
            return call(m, p, f), [f] + list(m.parameters())
        return run

    def voxelize():
        (f,) = _leaves(feats)
        return pointconv.voxelize(pts, f, 0.05)[0].features, [f]

    def devoxelize():
        x, _ = pointconv.voxelize(pts, feats, 0.05)
        vf, p = _leaves(x.features, pts)
        return pointconv.devoxelize(x.replace_feature(vf), p, 0.05), [vf, p]

    return {
        **{f"aggregate {r}": aggregate(r) for r in ("mean", "max", "sum", "weighted")},
        "adjacency": adjacency,
        "KNNConv": module(lambda: pointconv.nn.KNNConv(16, 8, 16), lambda m, p, f: m(p, f)),
        "EdgeConv": module(lambda: pointconv.nn.EdgeConv(16, 8, 8), lambda m, p, f: m(f)),
        "RadiusConv": module(lambda: pointconv.nn.RadiusConv(16, [8, 8], radius=0.08, k=16), lambda m, p, f: m(p, f)),
        "PointwiseConv3d": module(lambda: pointconv.nn.PointwiseConv3d(16, 9, cell_size=0.1),
                                  lambda m, p, f: m(p.detach(), f)),
        "voxelize": voxelize,
        "devoxelize": devoxelize,
    }


def _sparse_ops():
    g = torch.Generator().manual_seed(4)
    sites = torch.unique(torch.randint(0, 24, (8000, 3), generator=g), dim=0).int()
    sites = torch.cat([torch.zeros(len(sites), 1, dtype=torch.int32), sites], 1)
    feats = torch.randn(len(sites), 8, generator=g)

    def layer(make):
        def run():
            torch.manual_seed(3)
            m = make()
            (f,) = _leaves(feats)
            return m(spconv.SparseConvTensor(f, sites, [24, 24, 24], 1)).features, [f] + list(m.parameters())
        return run

    def sparse_add():
        parts = _leaves(feats[0::3], feats[1::3], feats[2::3], feats)
        tensors = [spconv.SparseConvTensor(parts[i], sites[i::3].contiguous(), [24, 24, 24], 1) for i in range(3)]
        tensors.append(spconv.SparseConvTensor(parts[3], sites, [24, 24, 24], 1))
        return spconv.functional.sparse_add(*tensors).features, parts

    return {
        "SubMConv3d": layer(lambda: spconv.SubMConv3d(8, 8, 3)),
        "SparseConv3d": layer(lambda: spconv.SparseConv3d(8, 8, 3, stride=2)),
        "SparseConvTranspose3d": layer(lambda: spconv.SparseConvTranspose3d(8, 8, 3, stride=2)),
        "SparseMaxPool3d": layer(lambda: spconv.SparseMaxPool3d(2, 2)),
        "SparseAvgPool3d": layer(lambda: spconv.SparseAvgPool3d(2, 2)),
        "sparse_add": sparse_add,
    }


OPS = {**_point_ops(), **_sparse_ops()}


@pytest.mark.parametrize("name", list(OPS))
def test_outputs_and_gradients_repeat_bitwise(name):
    runs = []
    for _ in range(4):
        out, leaves = OPS[name]()
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        runs.append([out.detach()] + list(torch.autograd.grad(out, leaves, cot)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
