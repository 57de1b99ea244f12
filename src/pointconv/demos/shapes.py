"""Generated shape classes for point-cloud classification: surface samples in the unit sphere."""
from __future__ import annotations

import math

import torch

from .. import _checks

CLASSES = ("sphere", "cube", "cylinder", "cone", "torus", "octahedron")


def _unit(n, g):
    v = torch.randn(n, 3, generator=g)
    return v / v.norm(dim=1, keepdim=True)


def _surface(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points on the surface of a canonical shape (roughly uniform by area)."""
    u = torch.rand(n, generator=g)
    v = torch.rand(n, generator=g)
    if kind == "sphere":
        return _unit(n, g)
    if kind == "cube":
        p = torch.rand(n, 3, generator=g) * 2 - 1
        axis = torch.randint(0, 3, (n,), generator=g)
        p[torch.arange(n), axis] = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        return p
    if kind == "cylinder":  # radius 1, height 2: side area 4 pi, each cap pi
        a = 2 * math.pi * u
        side = torch.stack([a.cos(), a.sin(), 2 * v - 1], 1)
        r = torch.rand(n, generator=g).sqrt()
        cap = torch.stack([r * a.cos(), r * a.sin(), torch.where(v < 0.5, -1.0, 1.0)], 1)
        return torch.where((torch.rand(n, generator=g) < 2 / 3)[:, None], side, cap)
    if kind == "cone":  # base radius 1 at z = -1, apex at z = 1: side area pi sqrt(5), base pi
        a = 2 * math.pi * u
        t = v.sqrt()  # radius fraction, uniform by area on the side
        side = torch.stack([t * a.cos(), t * a.sin(), 1 - 2 * t], 1)
        r = torch.rand(n, generator=g).sqrt()
        base = torch.stack([r * a.cos(), r * a.sin(), -torch.ones(n)], 1)
        return torch.where((torch.rand(n, generator=g) < 0.69)[:, None], side, base)
    if kind == "torus":  # major radius 0.7, minor 0.3 (rejection for uniform area)
        out = []
        while sum(len(o) for o in out) < n:
            a, b = 2 * math.pi * torch.rand(2 * n, generator=g), 2 * math.pi * torch.rand(2 * n, generator=g)
            keep = torch.rand(2 * n, generator=g) < (0.7 + 0.3 * b.cos()) / 1.0
            a, b = a[keep], b[keep]
            out.append(torch.stack([(0.7 + 0.3 * b.cos()) * a.cos(), (0.7 + 0.3 * b.cos()) * a.sin(), 0.3 * b.sin()], 1))
        return torch.cat(out)[:n]
    if kind == "octahedron":  # |x| + |y| + |z| = 1, uniform on the faces
        e = -torch.log(torch.rand(n, 3, generator=g))
        p = e / e.sum(1, keepdim=True)
        return p * (torch.randint(0, 2, (n, 3), generator=g).float() * 2 - 1)
    raise ValueError(f"kind must be one of {CLASSES}, got {kind!r}")


def _rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g))
    return q * torch.sign(torch.diagonal(r))


def sample_shape(label: int, n: int, g: torch.Generator, noise: float = 0.01, min_scale: float = 0.6) -> torch.Tensor:
    """A cloud ``(n, 3)`` of class ``CLASSES[label]``: random rotation, jitter, fitted into the unit
    sphere and scaled by a random factor in [min_scale, 1] (1: touching the sphere, as ModelNet's
    normalized clouds)."""
    if not 0 <= int(label) < len(CLASSES):
        raise ValueError(f"label must lie in [0, {len(CLASSES) - 1}], got {label}")
    n = _checks.positive_int("n", n)
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must lie in (0, 1], got {min_scale}")
    p = _surface(CLASSES[label], n, g) @ _rotation(g).T
    p = p / p.norm(dim=1).max()
    p = p * (min_scale + (1 - min_scale) * torch.rand(1, generator=g)) + noise * torch.randn(n, 3, generator=g)
    return p


def make_dataset(per_class: int, n_points: int, seed: int = 0):
    """``(points (C * per_class, n_points, 3), labels)``, classes interleaved."""
    per_class = _checks.positive_int("per_class", per_class)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat(per_class)
    points = torch.stack([sample_shape(int(c), n_points, g) for c in labels])
    return points, labels
