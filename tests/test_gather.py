import pytest
import torch

import pointconv
from pointconv.neighbors import gather_reference


def test_gather_values_and_missing(device):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 7, 5, generator=g).to(device)
    idx = torch.randint(-1, 7, (2, 4, 3), generator=g).to(device)
    out = pointconv.gather(v, idx)
    assert torch.equal(out, gather_reference(v, idx))
    for b in range(2):
        for q in range(4):
            for j in range(3):
                i = int(idx[b, q, j])
                expect = torch.zeros(5, device=device) if i < 0 else v[b, i]
                assert torch.equal(out[b, q, j], expect)


def test_gather_gradients_to_second_order():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(-1, 6, (2, 5, 4), generator=g)
    torch.autograd.gradcheck(lambda v: pointconv.gather(v, idx), (v,))
    torch.autograd.gradgradcheck(lambda v: pointconv.gather(v, idx) ** 2, (v,))


def test_gather_from_clouds_without_points_stays_on_the_graph():
    # P = 0 built its zeros apart from values: no grad_fn, so a loss through it could not backward
    values = torch.zeros(2, 0, 4, dtype=torch.float64, requires_grad=True)
    out = pointconv.gather(values, torch.full((2, 3, 2), -1))
    assert out.requires_grad and torch.equal(out, torch.zeros(2, 3, 2, 4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.sum(), values, create_graph=True)
    assert grad.shape == (2, 0, 4)


def test_gather_deterministic_gradient(deterministic_mode):
    v = torch.randn(1, 50, 8, requires_grad=True)
    idx = torch.randint(0, 50, (1, 400, 16))
    grads = []
    for _ in range(2):
        v.grad = None
        pointconv.gather(v, idx).pow(2).sum().backward()
        grads.append(v.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_gather_gradient_is_bitwise_repeatable_on_cpu_in_any_mode():
    # thousands of repeated indices: an accumulating index_put_ on CPU adds them on threads, in an
    # order (and so to bits) that changes from run to run outside deterministic mode
    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 3000, 3, generator=g, requires_grad=True)
    idx = torch.randint(0, 3000, (1, 4000, 8), generator=g)
    cot = torch.randn(1, 4000, 8, 3, generator=g)
    grads = [torch.autograd.grad(pointconv.gather(v, idx), v, cot)[0] for _ in range(6)]
    assert all(torch.equal(grads[0], other) for other in grads[1:])
    torch.testing.assert_close(grads[0][0], torch.zeros(3000, 3).index_put_((idx.reshape(-1),), cot.reshape(-1, 3),
                                                                            accumulate=True))


def test_gather_bad_input():
    v = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="idx must lie in"):
        pointconv.gather(v, torch.full((2, 1, 1), 5))
    with pytest.raises(ValueError, match="idx must lie in"):
        pointconv.gather(v, torch.full((2, 1, 1), -2))
    with pytest.raises(TypeError, match="idx must be an int64"):
        pointconv.gather(v, torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="batch size"):
        pointconv.gather(v, torch.zeros(3, 1, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="values must have shape"):
        pointconv.gather(v[0], torch.zeros(2, 1, 1, dtype=torch.int64))
    out = pointconv.gather(torch.randn(1, 0, 4), torch.full((1, 2, 3), -1))
    assert out.shape == (1, 2, 3, 4) and bool((out == 0).all())


@pytest.mark.parametrize("B,P,Q", [(1, 2, 0), (1, 0, 1), (0, 3, 2)])
def test_reference_of_empty_shapes(B, P, Q):
    values = torch.randn(B, P, 4)
    idx = torch.zeros(B, Q, 3, dtype=torch.long) if P else torch.full((B, Q, 3), -1)
    assert torch.equal(gather_reference(values, idx), pointconv.gather(values, idx))
    assert gather_reference(values, idx).shape == (B, Q, 3, 4)
