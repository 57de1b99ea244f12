"""Main job: fit a neural SDF with learnable anisotropic Gaussian feature points.

A cloud of feature points (position ``p``, feature ``f``, per-axis precision ``sigma``, rotation
``R`` from a quaternion) sits on the shape; ``pointconv.knn_aggregate_aniso`` blends the features
of each query's K neighbors, and a small MLP maps the normalized blend and the query position to
a signed distance. Losses: SDF = 0 and gradient = normal on surface samples, and the Eikonal term
``(|grad sdf| - 1)^2`` in the box: gradients of gradients, through the aggregation's double
backward, reach the MLP, f, p, sigma and R.

Built-in shape: a torus (radii 0.6 and 0.25), sampled with exact normals and signed distance.
``--points FILE`` fits a user's cloud (.ply, .xyz or .npy) instead, without normals.
At the end it prints mean |SDF| on the surface, the Eikonal error and the Chamfer distance of the
zero level set to the shape, and writes a PNG of SDF slices with the zero contours.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import time

import numpy as np
import torch
from torch import nn

import pointconv

TORUS_R, TORUS_r = 0.6, 0.25


# ----------------------------------------------------------------------------- shapes and files
def torus_sdf(x: torch.Tensor) -> torch.Tensor:
    ring = torch.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2) - TORUS_R
    return torch.sqrt(ring ** 2 + x[..., 2] ** 2) - TORUS_r


def torus_surface(n: int, g: torch.Generator):
    """Area-uniform samples of the torus and their outward normals."""
    u = torch.rand(n, generator=g) * 2 * math.pi
    # v with density proportional to R + r cos v (rejection sampling)
    v = torch.empty(0)
    while v.numel() < n:
        cand = torch.rand(2 * n, generator=g) * 2 * math.pi
        keep = torch.rand(2 * n, generator=g) * (TORUS_R + TORUS_r) < TORUS_R + TORUS_r * cand.cos()
        v = torch.cat([v, cand[keep]])
    v = v[:n]
    normal = torch.stack([v.cos() * u.cos(), v.cos() * u.sin(), v.sin()], -1)
    center = torch.stack([TORUS_R * u.cos(), TORUS_R * u.sin(), torch.zeros_like(u)], -1)
    return center + TORUS_r * normal, normal


def read_points(path: str) -> torch.Tensor:
    """An (N, 3) float32 cloud from .npy, .xyz (text, x y z first) or .ply (ascii or binary_little_endian)."""
    p = pathlib.Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        arr = np.load(p)
    elif suffix in (".xyz", ".txt"):
        arr = np.loadtxt(p, usecols=(0, 1, 2))
    elif suffix == ".ply":
        arr = _read_ply(p)
    else:
        raise ValueError(f"--points must be a .ply, .xyz or .npy file, got {path!r}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 3 or len(arr) < 16:
        raise ValueError(f"--points must hold at least 16 points with x, y, z; got shape {arr.shape}")
    arr = arr[:, :3]
    if not np.isfinite(arr).all():
        raise ValueError("--points contains NaN or Inf coordinates")
    return torch.from_numpy(arr).float()


_PLY_TYPES = {"char": "i1", "uchar": "u1", "short": "i2", "ushort": "u2", "int": "i4", "uint": "u4",
              "float": "f4", "double": "f8", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
              "int32": "i4", "uint32": "u4", "float32": "f4", "float64": "f8"}


def _read_ply(path: pathlib.Path) -> np.ndarray:
    data = path.read_bytes()
    end = data.index(b"end_header") + len(b"end_header")
    end = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii").splitlines()
    fmt = next(line.split()[1] for line in header if line.startswith("format"))
    count, props, in_vertex = 0, [], False
    for line in header:
        words = line.split()
        if words[:2] == ["element", "vertex"]:
            count, in_vertex = int(words[2]), True
        elif words and words[0] == "element":
            in_vertex = False
        elif in_vertex and words[:1] == ["property"] and words[1] != "list":
            props.append((words[2], _PLY_TYPES[words[1]]))
    names = [n for n, _ in props]
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"{path}: the vertex element has no x, y, z properties")
    cols = [names.index(c) for c in "xyz"]
    if fmt == "ascii":
        rows = data[end:].decode("ascii").split("\n")[:count]
        return np.array([[float(r.split()[c]) for c in cols] for r in rows])
    if fmt != "binary_little_endian":
        raise ValueError(f"{path}: PLY format {fmt} is not supported (ascii or binary_little_endian)")
    dtype = np.dtype([(n, "<" + t) for n, t in props])
    verts = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return np.stack([verts[c].astype(np.float64) for c in "xyz"], 1)


def normalize_cloud(x: torch.Tensor) -> torch.Tensor:
    """Center and scale into [-0.8, 0.8]^3 (the box the SDF is fitted in)."""
    lo, hi = x.min(0).values, x.max(0).values
    return (x - (lo + hi) / 2) / ((hi - lo).max() / 1.6)


# ----------------------------------------------------------------------------- the model
def quaternion_to_matrix(qt: torch.Tensor) -> torch.Tensor:
    w, x, y, z = (qt / qt.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).unflatten(-1, (3, 3))


class GaussianPointSDF(nn.Module):
    """Feature points with anisotropic Gaussians, blended by knn_aggregate_aniso, decoded by an MLP."""

    def __init__(self, anchors: torch.Tensor, features: int = 16, hidden: int = 64, k: int = 8):
        super().__init__()
        n = anchors.shape[0]
        spacing = float(pointconv.knn(anchors[None], anchors[None], 2, exclude_self=True).dists[..., 0]
                        .sqrt().mean())
        self.k = k
        self.p = nn.Parameter(anchors.clone())
        self.f = nn.Parameter(0.1 * torch.randn(n, features))
        self.log_sigma = nn.Parameter(torch.full((n, 3), math.log(1.0 / (4 * spacing ** 2))))
        self.quat = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))
        self.mlp = nn.Sequential(nn.Linear(features + 3, hidden), nn.Softplus(beta=100),
                                 nn.Linear(hidden, hidden), nn.Softplus(beta=100), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distance at ``x (N, 3)``."""
        sigma = self.log_sigma.exp()
        R = quaternion_to_matrix(self.quat)
        f_out, w, _, _ = pointconv.knn_aggregate_aniso(x[None], self.p[None], self.f[None], sigma[None], R[None],
                                                       self.k)
        feat = f_out[0] / (w[0].sum(-1, keepdim=True) + 1e-6)
        return self.mlp(torch.cat([feat, x], -1)).squeeze(-1)


def sdf_and_grad(model, x, create_graph):
    x = x.detach().requires_grad_(True)
    sdf = model(x)
    (grad,) = torch.autograd.grad(sdf.sum(), x, create_graph=create_graph)
    return sdf, grad


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _sdf_batches(model, x, batch=8192):
    return torch.cat([model(x[s:s + batch]) for s in range(0, len(x), batch)])


def zero_level_set(model, resolution=48, box=0.95):
    """Points on the fitted zero level set: grid points near it, projected by Newton steps."""
    t = torch.linspace(-box, box, resolution)
    grid = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)
    sdf = _sdf_batches(model, grid)
    x = grid[sdf.abs() < 2 * (2 * box / (resolution - 1))]
    for _ in range(3):
        out = []
        for s in range(0, len(x), 8192):
            val, g = sdf_and_grad(model, x[s:s + 8192], create_graph=False)
            out.append((x[s:s + 8192] - (val / g.square().sum(-1).clamp(min=1e-8))[:, None] * g).detach())
        x = torch.cat(out) if out else x
    return x


def chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    """Symmetric mean nearest-neighbor distance (not squared) between two clouds."""
    if len(a) == 0 or len(b) == 0:
        return float("inf")
    d_ab = pointconv.knn(a[None], b[None], 1).dists.sqrt().mean()
    d_ba = pointconv.knn(b[None], a[None], 1).dists.sqrt().mean()
    return float((d_ab + d_ba) / 2)


def evaluate(model, surface, g, box=0.95):
    surf_sdf = _sdf_batches(model, surface).abs().mean().item()
    x = (torch.rand(8192, 3, generator=g) * 2 - 1) * box
    _, grad = sdf_and_grad(model, x, create_graph=False)
    eik = (grad.norm(dim=-1) - 1).abs().mean().item()
    zls = zero_level_set(model, box=box)
    return {"mean abs SDF on surface": surf_sdf, "Eikonal error": eik, "Chamfer to shape": chamfer(zls, surface)}


def plot(model, out_path, true_sdf=None, cloud=None, box=0.95, res=160):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.linspace(-box, box, res)
    a, b = torch.meshgrid(t, t, indexing="ij")
    zero = torch.zeros_like(a)
    planes = [("z = 0", torch.stack([a, b, zero], -1), (0, 1)), ("y = 0", torch.stack([a, zero, b], -1), (0, 2))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (title, pts, (i, j)) in zip(axes, planes):
        flat = pts.reshape(-1, 3)
        pred = _sdf_batches(model, flat).reshape(res, res)
        lim = float(pred.abs().max())
        im = ax.imshow(pred.T.numpy(), origin="lower", extent=(-box, box, -box, box), cmap="RdBu", vmin=-lim, vmax=lim)
        ax.contour(a.numpy(), b.numpy(), pred.numpy(), levels=[0], colors="k", linewidths=2)
        if true_sdf is not None:
            ax.contour(a.numpy(), b.numpy(), true_sdf(flat).reshape(res, res).numpy(), levels=[0], colors="lime",
                       linewidths=1.5, linestyles="--")
        if cloud is not None:
            near = cloud[(cloud[:, 3 - i - j]).abs() < 0.02]
            ax.scatter(near[:, i], near[:, j], s=1, c="lime")
        ax.set_title(f"fitted SDF, slice {title}: black = zero level, green = true shape")
        ax.set_xlabel("xyz"[i])
        ax.set_ylabel("xyz"[j])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- training
def train(steps=1000, device="cpu", points=None, n_features=768, batch=1536, seed=0, progress=True):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if points is None:
        surface, normals = torus_surface(20000, g)
        true_sdf = torus_sdf
    else:
        surface, normals, true_sdf = normalize_cloud(points), None, None
    anchors = surface[torch.randperm(len(surface), generator=g)[:n_features]]
    model = GaussianPointSDF(anchors).to(device)
    opt = torch.optim.Adam([
        {"params": model.mlp.parameters(), "lr": 2e-3},
        {"params": [model.f], "lr": 5e-3},
        {"params": [model.p, model.quat, model.log_sigma], "lr": 1e-3},
    ])
    surface_d = surface.to(device)
    normals_d = normals.to(device) if normals is not None else None
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="fitting SDF", unit="step")
    t0 = time.perf_counter()
    for _ in bar:
        pick = torch.randint(0, len(surface_d), (batch,), device=device)
        xs = surface_d[pick]
        xb = (torch.rand(batch, 3, device=device) * 2 - 1) * 0.95
        x = torch.cat([xs, xb])
        sdf, grad = sdf_and_grad(model, x, create_graph=True)
        loss_surf = sdf[:batch].abs().mean()
        loss_eik = ((grad[batch:].norm(dim=-1) - 1) ** 2).mean()
        loss = 3.0 * loss_surf + 0.5 * loss_eik
        if normals_d is not None:
            loss = loss + 1.0 * (1 - torch.nn.functional.cosine_similarity(grad[:batch], normals_d[pick], dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}", surf=f"{loss_surf.item():.4f}", eik=f"{loss_eik.item():.4f}")
    model = model.cpu()
    metrics = evaluate(model, surface, g)
    metrics["seconds"] = time.perf_counter() - t0
    return model, metrics, true_sdf, surface


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pointconv demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--points", default=None, help="a .ply, .xyz or .npy cloud to fit instead of the torus")
    ap.add_argument("--out", default="pointconv_sdf.png", help="where to write the slices (PNG)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    points = read_points(args.points) if args.points else None
    shape = args.points or "built-in torus"
    print(f"pointconv {pointconv.__version__}: fitting a neural SDF to the {shape} on {args.device}, {args.steps} steps")
    model, metrics, true_sdf, surface = train(args.steps, args.device, points, seed=args.seed)
    plot(model, args.out, true_sdf=true_sdf, cloud=surface if true_sdf is None else None)
    print()
    print("| metric | value |")
    print("|---|---:|")
    for name, value in metrics.items():
        print(f"| {name} | {value:.4f} |")
    print()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
