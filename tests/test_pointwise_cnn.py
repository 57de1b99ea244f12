"""PointwiseCNN: padding, reused neighbor structures, bad input; the generated shapes."""
import pytest
import torch

import pointconv
from pointconv.demos.shapes import CLASSES, make_dataset, sample_shape


def model_and_clouds():
    torch.manual_seed(0)
    model = pointconv.nn.PointwiseCNN(len(CLASSES)).double()
    points, _ = make_dataset(1, 120, seed=3)
    return model, points[:2].double()


def test_padded_points_change_nothing():
    model, points = model_and_clouds()
    out = model(points, lengths=torch.tensor([120, 70]))
    torch.testing.assert_close(out[1], model(points[1:, :70])[0])
    torch.testing.assert_close(out[0], model(points[:1])[0])
    # the padding is really ignored: garbage there gives the same logits
    noisy = points.clone()
    noisy[1, 70:] = 5.0
    torch.testing.assert_close(model(noisy, lengths=torch.tensor([120, 70])), out)


def test_reused_neighbors_give_the_same_logits_and_gradients():
    model, points = model_and_clouds()
    nbrs = model.neighbors(points)
    a = model(points, neighbors=nbrs)
    ga = torch.autograd.grad(a.square().sum(), model.convs[0].weight)[0]
    b = model(points)
    gb = torch.autograd.grad(b.square().sum(), model.convs[0].weight)[0]
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert ga.abs().sum() > 0


def test_bad_input():
    model, points = model_and_clouds()
    with pytest.raises(ValueError, match="this layer expects 3"):
        model(points, torch.zeros(2, 120, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="neighbors must hold 4 structures"):
        model(points, neighbors=model.neighbors(points)[:3])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 120\]"):
        model(points, lengths=torch.tensor([121, 3]))
    with pytest.raises(ValueError, match="label must lie in"):
        sample_shape(len(CLASSES), 10, torch.Generator())
    with pytest.raises(ValueError, match="per_class must be >= 1"):
        make_dataset(0, 10)


def test_generated_shapes():
    g = torch.Generator().manual_seed(0)
    sphere = sample_shape(CLASSES.index("sphere"), 500, g, noise=0.0, min_scale=1.0)
    torch.testing.assert_close(sphere.norm(dim=1), torch.ones(500))
    points, labels = make_dataset(3, 400, seed=1)
    assert labels.tolist() == list(range(len(CLASSES))) * 3
    norms = points.norm(dim=-1).amax(1)
    assert bool((norms > 0.55).all() and (norms < 1.05).all())  # scale in [0.6, 1], jitter 0.01
    # a torus has a hole: no point near its axis at mid-height
    torus = sample_shape(CLASSES.index("torus"), 2000, g, noise=0.0, min_scale=1.0)
    centered = torus - torus.mean(0)
    axis = torch.linalg.svd(centered, full_matrices=False).Vh[-1]
    radial = (centered - (centered @ axis)[:, None] * axis).norm(dim=1)
    assert float(radial.min()) > 0.3
