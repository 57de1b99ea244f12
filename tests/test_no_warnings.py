"""Public ops warn about nothing: warnings from torch's internals (sparse tensors, deprecations)
would reach every user. Each run is a fresh interpreter with warnings as errors, because torch
warns about several things only once per process (torch 2.11, for one, warns once about unchecked
sparse tensors, whatever ``check_invariants`` says: the CSR products of Pointwise convolution and
``adjacency`` set torch's switch for that)."""
import subprocess
import sys
import textwrap

import pytest

_SETUP = """
import torch
import pointconv
import pointconv.sparse as spconv
torch.manual_seed(0)
pts = torch.rand(2, 120, 3)
feats = torch.randn(2, 120, 4, requires_grad=True)
"""

OPS = {
    "neighbors": """
        d, i = pointconv.knn(pts, pts, 8, exclude_self=True)
        pointconv.ball_query(pts, pts, 0.2, 8)
        pointconv.NeighborIndex(pts).knn(pts[:, :10], 4)
        pointconv.farthest_point_sample(pts, 16)
        pointconv.grid_subsample(pts, 0.1)
        pointconv.gather(feats, i).sum().backward()
        pb = torch.arange(2).repeat_interleave(120)
        pointconv.knn_packed(pts.reshape(-1, 3), pts.reshape(-1, 3), 4, query_batch=pb, points_batch=pb)
        pg = pts.reshape(-1, 3).clone().requires_grad_()  # (a check's float() of such a tensor warned)
        pointconv.knn_packed(pg, pg, 4, query_batch=pb, points_batch=pb).dists.sum().backward()
        pointconv.ball_query_packed(pg, pg, 0.2, 4, query_batch=pb, points_batch=pb).dists.sum().backward()
        pp = pts.clone().requires_grad_()
        pointconv.knn(pp, pp, 4).dists.sum().backward()
    """,
    "point convolutions": """
        i = pointconv.knn(pts, pts, 8).idx
        pointconv.aggregate(feats, i, "max").sum().backward()
        adj = pointconv.adjacency(i, 120)
        (adj @ feats.detach().reshape(-1, 4)).sum()
        w = torch.randn(5, 4, 3, 3, 3, requires_grad=True)
        g, = torch.autograd.grad(pointconv.pointwise_conv(pts, feats, w, 0.2, 2).square().sum(), w, create_graph=True)
        g.sum().backward()
        for m in (pointconv.nn.KNNConv(4, 6, 8), pointconv.nn.RadiusConv(4, [8], 0.3, 8), pointconv.nn.EdgeConv(4, 6, 8)):
            out = m(pts, feats) if not isinstance(m, pointconv.nn.EdgeConv) else m(feats)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
    """,
    "voxels": """
        x, voxel = pointconv.voxelize(pts, feats, 0.1)
        pointconv.devoxelize(x, pts, 0.1).sum().backward()
        net = spconv.SparseSequential(spconv.SubMConv3d(4, 8, 3, indice_key="a"), spconv.SparseBatchNorm(8),
                                      spconv.SparseReLU(), spconv.SparseConv3d(8, 8, 3, stride=2, indice_key="down"),
                                      spconv.SparseInverseConv3d(8, 4, 3, indice_key="down"))
        x, _ = pointconv.voxelize(pts, feats, 0.1)
        net(x).features.sum().backward()
    """,
    "gaussian": """
        sigma = torch.full((2, 120, 3), 20.0)
        R = torch.eye(3).expand(2, 120, 3, 3)
        q = torch.rand(2, 30, 3, requires_grad=True)
        out = pointconv.knn_aggregate_aniso(q, pts, feats, sigma, R, 8)
        f = out[0] if isinstance(out, tuple) else out
        g, = torch.autograd.grad(f.sum(), q, create_graph=True)
        g.square().sum().backward()
    """,
}


@pytest.mark.parametrize("name", list(OPS))
def test_public_ops_emit_no_warnings(name):
    code = _SETUP + textwrap.dedent(OPS[name])
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
