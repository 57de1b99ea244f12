import torch

import pointconv
from clouds import make_cloud


def test_index_matches_functional(device):
    p = make_cloud("clustered", 2, 400, seed=1, device=device)
    pl = torch.tensor([400, 123], device=device)
    index = pointconv.NeighborIndex(p, pl)
    for seed in range(3):  # queried many times
        q = make_cloud("clustered", 2, 100, seed=10 + seed, device=device)
        a = index.knn(q, 12)
        b = pointconv.knn(q, p, 12, points_lengths=pl)
        assert torch.equal(a.idx, b.idx) and torch.equal(a.dists, b.dists)
        a = index.ball_query(q, 0.2, 9)
        b = pointconv.ball_query(q, p, 0.2, 9, points_lengths=pl)
        assert torch.equal(a.idx, b.idx) and torch.equal(a.dists, b.dists)
    a = index.knn(p, 5, query_lengths=pl, exclude_self=True)
    b = pointconv.knn(p, p, 5, query_lengths=pl, points_lengths=pl, exclude_self=True)
    assert torch.equal(a.idx, b.idx)


def test_index_under_a_backend_forced_after_the_build():
    p = make_cloud("lattice", 1, 200, seed=2)
    index = pointconv.NeighborIndex(p)
    assert "trees" in repr(index)
    with pointconv.use_backend("reference"):
        a = index.knn(p, 7)
    assert torch.equal(a.idx, index.knn(p, 7).idx)


def test_index_gradients_flow_to_points():
    p = make_cloud("uniform", 1, 20, seed=3, dtype=torch.float64).requires_grad_()
    index = pointconv.NeighborIndex(p)
    q = make_cloud("uniform", 1, 5, seed=4, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda q, p: index.knn(q, 3).dists, (q, p))
