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
import re
import time
import warnings

import numpy as np
import torch
from torch import nn

import pointconv
from pointconv.demos._cli import check_device, check_out, positive_int, seed_int

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
    """An (N, 3) float64 cloud from .npy, .xyz (text, x y z first) or .ply (ascii or binary, any elements).

    Exact duplicate points are dropped (the first of each is kept, in order). ValueError (naming the
    file) for unreadable files, fewer than 16 distinct points, a cloud of zero extent, and NaN or Inf
    coordinates. Float64, so that clouds far from the origin (map coordinates, say) keep their
    detail until ``normalize_cloud`` centers them."""
    p = pathlib.Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".xyz", ".txt", ".ply"):
        raise ValueError(f"--points must be a .ply, .xyz or .npy file, got {path!r}")
    if suffix == ".ply":
        return _checked_cloud(path, _read_ply(p))
    try:
        if suffix == ".npy":
            arr = np.load(p)
            if not isinstance(arr, np.ndarray):  # an .npz archive under an .npy name
                raise ValueError("it holds an archive of arrays (.npz), not one array")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # empty file: the size check below says it
                arr = np.loadtxt(p, usecols=(0, 1, 2), ndmin=2)
    except (ValueError, TypeError, EOFError) as e:
        raise ValueError(f"{path}: cannot read the points: {e}") from None
    return _checked_cloud(path, arr)


def _checked_cloud(path: str, arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.names is not None:  # a structured .npy: take its x, y, z fields
        if not {"x", "y", "z"} <= set(arr.dtype.names):
            raise ValueError(f"{path}: a structured array needs x, y, z fields, got {arr.dtype.names}")
        arr = np.stack([arr[c] for c in "xyz"], -1)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{path}: the coordinates must be integers or floats, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 3 or len(arr) < 16:
        raise ValueError(f"{path}: --points must hold at least 16 points with x, y, z; got shape {arr.shape}")
    arr = arr[:, :3].astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: --points contains NaN or Inf coordinates")
    if not (arr.max(0) > arr.min(0)).any():
        raise ValueError(f"{path}: all the points are the same point (the cloud has zero extent)")
    _, first = np.unique(arr, axis=0, return_index=True)
    if len(first) < 16:
        raise ValueError(f"{path}: --points must hold at least 16 distinct points, got {len(first)}")
    return torch.from_numpy(arr[np.sort(first)])


_PLY_TYPES = {"char": "i1", "uchar": "u1", "short": "i2", "ushort": "u2", "int": "i4", "uint": "u4",
              "float": "f4", "double": "f8", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
              "int32": "i4", "uint32": "u4", "float32": "f4", "float64": "f8"}
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


def _ply_header(path, data: bytes):
    """(format, body offset, elements): elements are [name, count, [(name, type or (count type, item type))]]."""
    if not data.startswith(b"ply"):
        raise ValueError(f"{path}: not a PLY file (it does not start with 'ply')")
    # a line start: after \n (re.M's ^) or after a lone \r (old Mac line ends)
    match = re.search(rb"(?:^|\r)end_header[ \t]*(\r\n|\n|\r|\Z)", data, re.M)
    if match is None:
        raise ValueError(f"{path}: PLY header has no end_header line")
    fmt, elements = None, []
    for line in data[:match.start()].decode("ascii", "replace").splitlines()[1:]:
        w = line.split()
        try:
            if not w or w[0] in ("comment", "obj_info"):
                continue
            if w[0] == "format" and len(w) >= 2:
                fmt = w[1]
            elif w[0] == "element" and len(w) == 3 and int(w[2]) >= 0:
                elements.append([w[1], int(w[2]), []])
            elif w[0] == "property" and elements and w[1] == "list" and len(w) == 5:
                elements[-1][2].append((w[4], (_PLY_TYPES[w[2]], _PLY_TYPES[w[3]])))
            elif w[0] == "property" and elements and len(w) == 3:
                elements[-1][2].append((w[2], _PLY_TYPES[w[1]]))
            else:
                raise ValueError
        except KeyError as e:
            raise ValueError(f"{path}: unknown PLY property type {e.args[0]!r} in {line.strip()!r}") from None
        except (ValueError, IndexError):
            raise ValueError(f"{path}: malformed PLY header line {line.strip()!r}") from None
    if fmt not in _PLY_FORMATS:
        raise ValueError(f"{path}: PLY format {fmt!r} is not supported (ascii, binary_little_endian or "
                         "binary_big_endian)")
    return fmt, match.end(), elements


def _read_ply(path: pathlib.Path) -> np.ndarray:
    """x, y, z (float64, (N, 3)) of the vertex element of an ascii or binary PLY file."""
    data = path.read_bytes()
    fmt, offset, elements = _ply_header(path, data)
    vi = next((i for i, e in enumerate(elements) if e[0] == "vertex"), None)
    if vi is None:
        raise ValueError(f"{path}: the PLY file has no vertex element")
    _, count, props = elements[vi]
    names = [n for n, _ in props]
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"{path}: the vertex element has no x, y, z properties")
    cols = [names.index(c) for c in "xyz"]
    truncated = ValueError(f"{path}: the PLY file is truncated or its data does not match the header")
    if fmt == "ascii":  # one line per element item
        lines = [ln for ln in data[offset:].decode("ascii", "replace").splitlines() if ln.strip()]
        first = sum(e[1] for e in elements[:vi])
        rows = lines[first:first + count]
        if len(rows) < count:
            raise truncated
        try:
            if all(isinstance(t, str) for _, t in props):
                return np.array([[float(r.split()[c]) for c in cols] for r in rows], dtype=np.float64).reshape(-1, 3)
            out = np.empty((count, 3))
            for i, r in enumerate(rows):
                words, at, where = r.split(), 0, []
                for _, t in props:
                    where.append(at)
                    at += 1 if isinstance(t, str) else 1 + int(words[at])
                out[i] = [float(words[where[c]]) for c in cols]
            return out
        except (ValueError, IndexError):
            raise truncated from None
    order = _PLY_FORMATS[fmt]

    def scalar(t, at):
        if at + np.dtype(t).itemsize > len(data):
            raise truncated
        return np.frombuffer(data, order + t, 1, at)[0]

    for _, n, eprops in elements[:vi + 1]:
        if all(isinstance(t, str) for _, t in eprops):  # fixed size: one structured read or one jump
            dtype = np.dtype([(f"p{j}", order + t) for j, (_, t) in enumerate(eprops)])
            if offset + n * dtype.itemsize > len(data):
                raise truncated
            if eprops is props:
                rec = np.frombuffer(data, dtype, count, offset)
                return np.stack([rec[f"p{c}"].astype(np.float64) for c in cols], 1).reshape(-1, 3)
            offset += n * dtype.itemsize
            continue
        is_vertex = eprops is props
        out = np.empty((n, 3)) if is_vertex else None
        for i in range(n):  # walk the list counts
            values = []
            for _, t in eprops:
                if isinstance(t, str):
                    values.append(scalar(t, offset) if is_vertex else None)
                    offset += np.dtype(t).itemsize
                else:
                    k = int(scalar(t[0], offset))
                    values.append(None)
                    offset += np.dtype(t[0]).itemsize + k * np.dtype(t[1]).itemsize
            if offset > len(data):
                raise truncated
            if is_vertex:
                out[i] = [values[c] for c in cols]
        if is_vertex:
            return out
    raise AssertionError("unreachable")


def normalize_cloud(x: torch.Tensor) -> torch.Tensor:
    """Center and scale into [-0.8, 0.8]^3 (the box the SDF is fitted in); ValueError for a single point."""
    x64 = x.double()
    # by a power of two first (exact): coordinates near 1e308 would overflow hi - lo and lo + hi
    largest = float(x64.abs().max()) if x64.numel() else 0.0
    exponent = -math.frexp(largest)[1]  # -1024 to 1074: 2^exponent alone may not be a float64
    x64 = x64 * math.ldexp(1.0, exponent // 2) * math.ldexp(1.0, exponent - exponent // 2)
    lo, hi = x64.min(0).values, x64.max(0).values
    extent = float((hi - lo).max())
    if not extent > 0:
        raise ValueError("the cloud has zero extent (all its points are the same point)")
    return ((x64 - (lo + hi) / 2) / (extent / 1.6)).to(x.dtype)


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
        nearest = pointconv.knn(anchors[None], anchors[None], 2, exclude_self=True).dists[0, :, 0].sqrt()
        nearest = nearest[nearest > 0]  # duplicated anchors are at distance 0 from each other
        extent = float((anchors.max(0).values - anchors.min(0).values).max())
        spacing = float(nearest.mean()) if len(nearest) else max(extent, 1e-3) / max(n, 1) ** (1 / 3)
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
    if len(a) == 0 or len(b) == 0:  # (no zero level set found: said where the metrics are printed)
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
        # centered and scaled in float64, then float32 (the model's dtype): a float32 cloud far from
        # the origin would have lost its detail in the rounding
        surface, normals, true_sdf = normalize_cloud(points.double()).float(), None, None
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
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The neighbor-search demo: python -m pointconv demo neighbors --help")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--steps", type=positive_int, default=1000, help="training steps (>= 1)")
    ap.add_argument("--points", default=None, help="a .ply, .xyz or .npy cloud to fit instead of the torus")
    ap.add_argument("--out", default="pointconv_sdf.png",
                    help="where to write the slices (.png, or another format matplotlib writes: pdf, svg, ...)")
    ap.add_argument("--seed", type=seed_int, default=0, help="random seed (-2**63 to 2**63 - 1)")
    args = ap.parse_args(argv)
    try:  # user errors: a usage message and status 2, before any training
        check_device(args.device)
        check_out(args.out)
        if args.points == "":
            raise ValueError("--points is empty (an unset variable?): name a .ply, .xyz or .npy file")
        points = read_points(args.points) if args.points is not None else None
    except (ValueError, OSError, TypeError) as e:
        ap.error(str(e))
    shape = args.points or "built-in torus"
    print(f"pointconv {pointconv.__version__}: fitting a neural SDF to the {shape} on {args.device}, {args.steps} steps")
    model, metrics, true_sdf, surface = train(args.steps, args.device, points, seed=args.seed)
    plot(model, args.out, true_sdf=true_sdf, cloud=surface if true_sdf is None else None)
    print()
    print("| metric | value |")
    print("|---|---:|")
    for name, value in metrics.items():
        print(f"| {name} | {value:.4f} |")
    if math.isinf(metrics.get("Chamfer to shape", 0.0)):
        print("\nChamfer to shape is inf: the fitted SDF has no zero level set in the box (too few steps?)")
    print()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
