import pytest
import torch

import pointconv
from pointconv.neighbors import packed_to_padded
from clouds import make_cloud


def _packed(sizes, seed, kind="uniform", device="cpu"):
    x = make_cloud(kind, 1, sum(sizes), seed=seed, device=device)[0]
    batch = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return x, batch


@pytest.mark.parametrize("kind", ["uniform", "duplicated", "lattice"])
def test_knn_packed_equals_padded(kind, device):
    q, qb = _packed([30, 0, 50, 7], 1, kind, device)
    p, pb = _packed([40, 20, 3, 0], 2, kind, device)
    res = pointconv.knn_packed(q, p, 5, query_batch=qb, points_batch=pb)
    qpad, ql, _, qpos = packed_to_padded(q, qb, 4)
    ppad, pl, poff, _ = packed_to_padded(p, pb, 4)
    ref = pointconv.knn(qpad, ppad, 5, query_lengths=ql, points_lengths=pl)
    ref_idx = ref.idx[qb, qpos]
    assert torch.equal(res.idx, torch.where(ref_idx >= 0, ref_idx + poff[qb, None], -1))
    assert torch.equal(res.dists, ref.dists[qb, qpos])
    # each query's neighbors are in its own cloud and the distances are to the packed points
    found = res.idx >= 0
    assert torch.equal(pb[res.idx[found]], qb[:, None].expand_as(res.idx)[found])
    d = ((q[:, None] - p[res.idx.clamp(min=0)]) ** 2).sum(-1)
    assert torch.allclose(res.dists[found], d[found])
    # cloud 3 has no points: its queries get nothing
    assert bool((res.idx[qb == 3] == -1).all())


def test_ball_query_packed_and_exclude_self(device):
    p, pb = _packed([25, 35], 3, device=device)
    res = pointconv.ball_query_packed(p, p, 0.3, 8, query_batch=pb, points_batch=pb, exclude_self=True)
    assert not bool((res.idx == torch.arange(60, device=device)[:, None]).any())
    d = ((p[:, None] - p[None]) ** 2).sum(-1)
    same = pb[:, None] == pb[None]
    inside = (d <= 0.09) & same & ~torch.eye(60, dtype=torch.bool, device=device)
    assert torch.equal((res.idx >= 0).sum(1), inside.sum(1).clamp(max=8))


def test_packed_bad_batch_vectors():
    p, pb = _packed([5, 5], 4)
    with pytest.raises(ValueError, match="query_batch must be sorted"):
        pointconv.knn_packed(p, p, 2, query_batch=pb.flip(0), points_batch=pb)
    with pytest.raises(TypeError, match="points_batch must be an int64"):
        pointconv.knn_packed(p, p, 2, query_batch=pb, points_batch=pb.int())
    with pytest.raises(ValueError, match="points_batch must have shape"):
        pointconv.knn_packed(p, p, 2, query_batch=pb, points_batch=pb[:3])
    with pytest.raises(ValueError, match="same packed cloud"):
        pointconv.knn_packed(p[:4], p, 2, query_batch=pb[:4], points_batch=pb, exclude_self=True)
