import pytest
import torch

import pointconv
from pointconv.neighbors import packed, packed_to_padded
from clouds import make_cloud


def _packed(sizes, seed, kind="uniform", device="cpu"):
    x = make_cloud(kind, 1, sum(sizes), seed=seed, device=device)[0]
    batch = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return x, batch


def _padded_reference(fn, q, qb, p, pb, nb, *args, **kwargs):
    """``fn`` on the padded form of the whole batch, its indices mapped into the packed points."""
    qpad, ql, _, qpos = packed_to_padded(q, qb, nb)
    ppad, pl, poff, _ = packed_to_padded(p, pb, nb)
    ref = fn(qpad, ppad, *args, query_lengths=ql, points_lengths=pl, **kwargs)
    ref_idx = ref.idx[qb, qpos]
    return ref.dists[qb, qpos], torch.where(ref_idx >= 0, ref_idx + poff[qb, None], -1)


@pytest.mark.parametrize("kind", ["uniform", "duplicated", "lattice"])
def test_knn_packed_equals_padded(kind, device):
    q, qb = _packed([30, 0, 50, 7], 1, kind, device)
    p, pb = _packed([40, 20, 3, 0], 2, kind, device)
    res = pointconv.knn_packed(q, p, 5, query_batch=qb, points_batch=pb)
    dists, idx = _padded_reference(pointconv.knn, q, qb, p, pb, 4, 5)
    assert torch.equal(res.idx, idx)
    assert torch.equal(res.dists, dists)
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


# sizes spread over two orders of magnitude, empty clouds on either side, in no size order
_UNEVEN_Q = [40, 900, 0, 7, 300, 1, 2, 120, 33, 5]
_UNEVEN_P = [60, 1000, 8, 0, 250, 1, 3, 100, 45, 6]


@pytest.mark.parametrize("search", ["knn", "ball_query"])
def test_packed_uneven_clouds_are_searched_in_groups(search, device, monkeypatch):
    """Clouds of very different sizes: searched in groups of similar sizes (the padded rows stay
    within twice the packed ones), with the results of one padded search of the whole batch."""
    monkeypatch.setattr(packed, "_PAD_SLACK", 0)  # groups even for these small clouds
    q, qb = _packed(_UNEVEN_Q, 5, device=device)
    p, pb = _packed(_UNEVEN_P, 6, device=device)
    padded_fn = getattr(pointconv, search)
    calls = []

    def spy(query, points, *args, **kwargs):
        calls.append((query.shape[:2], points.shape[:2]))
        return padded_fn(query, points, *args, **kwargs)

    monkeypatch.setattr(packed, search, spy)
    args = (6,) if search == "knn" else (0.4, 6)
    res = getattr(pointconv, search + "_packed")(q, p, *args, query_batch=qb, points_batch=pb)
    dists, idx = _padded_reference(padded_fn, q, qb, p, pb, len(_UNEVEN_Q), *args)
    assert torch.equal(res.idx, idx)
    assert torch.equal(res.dists, dists)
    assert len(calls) >= 3
    assert sum(b * n for (b, n), _ in calls) <= 2 * q.shape[0]
    assert sum(b * n for _, (b, n) in calls) <= 2 * p.shape[0]
    # the clouds without queries or without points are not searched at all
    assert sum(b for (b, _), _ in calls) == sum(1 for a, b in zip(_UNEVEN_Q, _UNEVEN_P) if a and b)


def test_packed_exclude_self_in_groups(monkeypatch):
    monkeypatch.setattr(packed, "_PAD_SLACK", 0)
    p, pb = _packed(_UNEVEN_P, 7)
    res = pointconv.knn_packed(p, p, 4, query_batch=pb, points_batch=pb, exclude_self=True)
    dists, idx = _padded_reference(pointconv.knn, p, pb, p, pb, len(_UNEVEN_P), 4, exclude_self=True)
    assert torch.equal(res.idx, idx)
    assert torch.equal(res.dists, dists)
    assert not bool((res.idx == torch.arange(p.shape[0])[:, None]).any())


def test_size_groups_bound_padding():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(1, 40, (1,), generator=g))
        q = (torch.rand(n, generator=g) * 10).exp().long().mul(torch.rand(n, generator=g) > 0.1).tolist()
        p = (torch.rand(n, generator=g) * 10).exp().long().mul(torch.rand(n, generator=g) > 0.1).tolist()
        slack = [0, 16, packed._PAD_SLACK][trial % 3]
        groups = packed._size_groups(q, p, slack)
        flat = [c for group in groups for c in group]
        assert sorted(flat) == [c for c in range(n) if q[c] and p[c]]
        for group in groups:
            for counts in (q, p):
                assert len(group) * max(counts[c] for c in group) <= 2 * sum(counts[c] for c in group) + slack
    # counts that grow together: one group per halving of the size
    sizes = [2 ** e for e in range(12)] * 3
    assert len(packed._size_groups(sizes, sizes, 0)) <= 13
    assert len(packed._size_groups(sizes, sizes, packed._PAD_SLACK)) <= 3
    # equal clouds: one search
    assert packed._size_groups([50] * 9, [70] * 9, 0) == [list(range(9))]


def test_packed_dists_gradients(monkeypatch):
    monkeypatch.setattr(packed, "_PAD_SLACK", 0)
    q, qb = _packed([9, 2, 4, 0], 8)
    p, pb = _packed([10, 3, 5, 2], 9)
    q, p = q.double().requires_grad_(), p.double().requires_grad_()

    def f(q, p):
        d = pointconv.knn_packed(q, p, 3, query_batch=qb, points_batch=pb).dists
        return torch.where(torch.isfinite(d), d, 0)

    assert torch.autograd.gradcheck(f, (q, p))
    assert torch.autograd.gradgradcheck(f, (q, p))
