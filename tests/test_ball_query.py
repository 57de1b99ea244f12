import pytest
import torch
from hypothesis import given, settings, strategies as st

import pointconv
from pointconv.neighbors import ball_query_reference
from clouds import KINDS, make_cloud


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("radius,k", [(0.05, 8), (0.2, 16), (1.0, 4), (100.0, 5)])
def test_ball_query_matches_reference(kind, radius, k, device):
    q = make_cloud(kind, 2, 200, seed=1, device=device)
    p = make_cloud(kind, 2, 300, seed=2, device=device)
    res = pointconv.ball_query(q, p, radius, k)
    ref = ball_query_reference(q, p, radius, k)
    assert torch.equal(res.idx, ref.idx) and torch.equal(res.dists, ref.dists)
    assert bool((res.dists[res.idx >= 0] <= radius**2 * (1 + 1e-6)).all())


def test_returns_the_nearest_not_the_first_found():
    # 20 points inside the ball at decreasing distance: the answer is the last (nearest) ones.
    p = torch.linspace(0.95, 0.0, 20)[None, :, None].expand(1, 20, 3).contiguous() / 3**0.5
    q = torch.zeros(1, 1, 3)
    res = pointconv.ball_query(q, p, 1.0, 3)
    assert res.idx.tolist() == [[[19, 18, 17]]]


def test_closed_ball_boundary():
    p = torch.tensor([[[1.0, 0, 0], [0, 2.0, 0], [0.5, 0, 0]]])
    q = torch.zeros(1, 1, 3)
    res = pointconv.ball_query(q, p, 1.0, 4)
    assert res.idx.tolist() == [[[2, 0, -1, -1]]]


def test_exclude_self_and_lengths(device):
    p = make_cloud("duplicated", 2, 100, seed=3, device=device)
    pl = torch.tensor([100, 37], device=device)
    res = pointconv.ball_query(p, p, 0.3, 6, query_lengths=pl, points_lengths=pl, exclude_self=True)
    ref = ball_query_reference(p, p, 0.3, 6, query_lengths=pl, points_lengths=pl, exclude_self=True)
    assert torch.equal(res.idx, ref.idx)


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 2), Q=st.integers(0, 30), P=st.integers(0, 30), k=st.integers(1, 40),
       radius=st.floats(0.01, 3.0), lattice=st.booleans(), seed=st.integers(0, 2**16))
def test_ball_query_property(B, Q, P, k, radius, lattice, seed):
    g = torch.Generator().manual_seed(seed)
    if lattice:
        q = torch.randint(0, 3, (B, Q, 3), generator=g).double() * 0.5
        p = torch.randint(0, 3, (B, P, 3), generator=g).double() * 0.5
    else:
        q, p = torch.rand(B, Q, 3, generator=g), torch.rand(B, P, 3, generator=g)
    res = pointconv.ball_query(q, p, radius, k)
    ref = ball_query_reference(q, p, radius, k)
    assert torch.equal(res.idx, ref.idx) and torch.equal(res.dists, ref.dists)
    inside = ((q[:, :, None] - p[:, None]) ** 2).sum(-1) <= radius**2
    assert torch.equal((res.idx >= 0).sum(-1), inside.sum(-1).clamp(max=k))
