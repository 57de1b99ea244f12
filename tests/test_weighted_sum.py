import torch

from pointconv import _weighted_sum
from pointconv._weighted_sum import gather_sum, gather_sum_reference


def _inputs(Q=7, P=5, k=4, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(Q, k, generator=g, dtype=torch.float64, requires_grad=True)
    f = torch.randn(P, C, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(-1, P, (Q, k), generator=g)
    return w, f, idx


def test_matches_reference_and_chunks(monkeypatch):
    w, f, idx = _inputs(Q=50, P=9, k=6, C=4)
    ref = gather_sum_reference(w, f, idx)
    torch.testing.assert_close(gather_sum(w, f, idx), ref)
    monkeypatch.setattr(_weighted_sum, "_CHUNK_ELEMENTS", 30)  # several chunks
    torch.testing.assert_close(gather_sum(w, f, idx), ref)
    gw, gf = torch.autograd.grad(gather_sum(w, f, idx).square().sum(), (w, f))
    rw, rf = torch.autograd.grad(ref.square().sum(), (w, f))
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gf, rf)


def test_gradients_to_third_order():
    w, f, idx = _inputs()
    torch.autograd.gradcheck(lambda w, f: gather_sum(w, f, idx), (w, f))
    torch.autograd.gradgradcheck(lambda w, f: gather_sum(w, f, idx), (w, f))

    def grad_fn(w, f):  # a first-order gradient, differentiated twice more by gradgradcheck
        out = gather_sum(w, f, idx)
        return torch.autograd.grad(out.pow(3).sum(), (w, f), create_graph=True)

    torch.autograd.gradgradcheck(grad_fn, (w, f))


def test_missing_neighbors_contribute_nothing():
    w, f, _ = _inputs()
    idx = torch.full((7, 4), -1)
    assert bool((gather_sum(w, f, idx) == 0).all())
    gw, gf = torch.autograd.grad(gather_sum(w, f, idx).sum(), (w, f))
    assert bool((gw == 0).all()) and bool((gf == 0).all())
