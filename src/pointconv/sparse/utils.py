"""``PointToVoxel``: spconv's point-cloud voxelizer, vectorized in torch on any device.

Points outside ``coors_range_xyz`` are dropped. A point's voxel is ``floor((xyz - lo) / vsize)``
and the grid has ``round((hi - lo) / vsize)`` voxels per axis, both computed in float32 as spconv
computes them (float64 for float64 points): the float64 quotient of a float32 point at 0.7 and a
0.1 voxel floors to 6, spconv's float32 one to 7, and every point on a voxel face would move. As in spconv, the first
``max_num_voxels`` voxels in order of first appearance are kept and each keeps its first
``max_num_points_per_voxel`` points (input order); unlike spconv's hash order, the kept voxels
come out sorted by their (z, y, x) coordinates, so the output is deterministic. Coordinates are
returned in ZYX order like spconv; like spconv, 1 to 4 axes (the length of ``vsize_xyz``; the
coordinates come last axis first).
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _checks
from .kernel_map import INT32_MAX


def _floats(name: str, values) -> torch.Tensor:
    """A list / tuple / tensor of real numbers as a 1-D float64 tensor."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype == torch.bool or values.is_complex():
            raise ValueError(f"{name} must be a list of numbers, got a tensor of shape {tuple(values.shape)}")
        return values.detach().to("cpu", torch.float64)
    try:
        vals = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a list of numbers, got {type(values).__name__}") from None
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in vals):
        raise TypeError(f"{name} must hold numbers, got {vals!r}")
    return torch.tensor([float(v) for v in vals], dtype=torch.float64)


class PointToVoxel:
    def __init__(self, vsize_xyz, coors_range_xyz, num_point_features, max_num_voxels, max_num_points_per_voxel,
                 device=torch.device("cpu")):
        vsize = _floats("vsize_xyz", vsize_xyz)
        rng = _floats("coors_range_xyz", coors_range_xyz)
        D = vsize.shape[0]  # 3 for x, y, z; spconv takes 1 to 4 axes
        # finite in float32 too: spconv's float32 arithmetic (below) takes them as float32 numbers
        if not 1 <= D <= 4 or not bool(torch.isfinite(vsize.float()).all() and (vsize.float() > 0).all()):
            raise ValueError(f"vsize_xyz must be 1 to 4 positive sizes (x, y, z, ...), finite and nonzero in "
                             f"float32, got {list(vsize_xyz)}")
        if rng.shape != (2 * D,) or not bool(torch.isfinite(rng.float()).all() and (rng[D:] > rng[:D]).all()):
            raise ValueError(f"coors_range_xyz must be {2 * D} numbers finite in float32, the low corner then the high one "
                             f"([x0, y0, z0, x1, y1, z1] in 3-D, x1 > x0 ...), got {list(coors_range_xyz)}")
        self.ndim = D
        # x, y, z order inside; spconv's attributes (below) are z, y, x
        self._vsize_xyz = vsize
        self._lo, hi = rng[:D], rng[D:]
        # spconv: std::round of the float32 quotient (halves away from zero); held in float64: no overflow yet
        quotient = ((hi.float() - self._lo.float()) / vsize.float()).double()
        grid = torch.floor(quotient + 0.5)
        if bool((grid < 1).any()):  # spconv builds a grid without voxels there, and drops every point
            raise ValueError(f"coors_range_xyz {list(coors_range_xyz)} spans less than half a voxel (vsize_xyz "
                             f"{list(vsize_xyz)}) along an axis: round((x1 - x0) / vsize) = 0 voxels there")
        # the voxel indices are int32 and a voxel's key, z * gy * gx + y * gx + x, int64
        cells = [int(g) if math.isfinite(g) else g for g in grid.tolist()]  # (hi - lo may pass float32's range)
        if max(cells) > INT32_MAX or math.prod(cells) > 2**63:
            raise ValueError(f"vsize_xyz {list(vsize_xyz)} is too small for coors_range_xyz {list(coors_range_xyz)}: "
                             f"the grid would have {cells} voxels (x, y, z), at most 2**31 - 1 per axis and 2**63 "
                             "in all")
        self._grid_xyz = grid.long()
        # spconv's attributes, as its calc_point2voxel_meta_data gives them: z, y, x lists (sizes and
        # the range's corners in float32), the grid's shape (a SparseConvTensor's spatial_shape) and
        # the row-major strides of its voxel keys
        self.vsize = vsize.float().flip(0).tolist()
        self.grid_size = self._grid_xyz.flip(0).tolist()
        self.grid_stride = [math.prod(self.grid_size[a + 1:]) for a in range(D)]
        self.coors_range = self._lo.float().flip(0).tolist() + hi.float().flip(0).tolist()
        self.num_point_features = _checks.positive_int("num_point_features", num_point_features)
        if self.num_point_features < D:
            raise ValueError(f"num_point_features counts the {D} coordinates and the rest: must be >= {D}, got "
                             f"{num_point_features}")
        self.max_num_voxels = _checks.positive_int("max_num_voxels", max_num_voxels)
        self.max_num_points_per_voxel = _checks.positive_int("max_num_points_per_voxel", max_num_points_per_voxel)
        self.device = torch.device(device)

    @property
    def spatial_shape(self) -> list[int]:
        """Grid size in ZYX order (the ``spatial_shape`` of a SparseConvTensor built from the voxels)."""
        return list(self.grid_size)

    def __call__(self, pc: torch.Tensor, clear_voxels: bool = True, empty_mean: bool = False):
        voxels, indices, num_points, _ = self.generate_voxel_with_id(pc, clear_voxels, empty_mean)
        return voxels, indices, num_points

    def generate_voxel_with_id(self, pc: torch.Tensor, clear_voxels: bool = True, empty_mean: bool = False):
        """``(voxels (M, max_pts, F), indices_zyx (M, ndim) int32, num_points_per_voxel (M,) int32,
        pc_voxel_id (N,) int64)``; ``pc_voxel_id`` is -1 for points outside the range or in a dropped voxel.
        Empty slots of ``voxels`` are zero, or the voxel's mean with ``empty_mean``. ``clear_voxels``
        is spconv's (False skips zeroing the buffer it reuses between calls, leaving old points in
        the empty slots); the voxels here are a new tensor every call, so it changes nothing."""
        _checks.tensor("pc", pc)
        _checks.flag("clear_voxels", clear_voxels)
        empty_mean = _checks.flag("empty_mean", empty_mean)
        F = self.num_point_features
        if pc.dim() != 2 or pc.shape[1] != F:
            raise ValueError(f"pc must have shape (N, {F}), got shape {tuple(pc.shape)}")
        if not pc.is_floating_point():
            raise TypeError(f"pc must be a floating-point tensor, got dtype {pc.dtype}")
        dev = pc.device
        N = pc.shape[0]
        P = self.max_num_points_per_voxel
        D = self.ndim
        work = torch.float64 if pc.dtype == torch.float64 else torch.float32  # spconv's float32 arithmetic
        lo, vsize, grid = self._lo.to(dev, work), self._vsize_xyz.to(dev, work), self._grid_xyz.to(dev)
        c = torch.floor((pc[:, :D].to(work) - lo) / vsize).double()
        # in float64 first: casting a far (or NaN) point's cell to int64 is undefined
        inside = ((c >= 0) & (c < grid)).all(1)
        c = torch.where(inside[:, None], c, 0).long()
        key = c[:, D - 1]  # the last axis slowest: z * gy * gx + y * gx + x in 3-D
        for a in range(D - 2, -1, -1):
            key = key * grid[a] + c[:, a]
        pts = torch.nonzero(inside).flatten()
        uniq, inv = torch.unique(key[pts], sorted=True, return_inverse=True)
        U = uniq.shape[0]
        first = torch.full((U,), N, dtype=torch.int64, device=dev).scatter_reduce(0, inv, pts, "amin")
        kept = torch.zeros(U, dtype=torch.bool, device=dev)
        kept[torch.argsort(first)[: self.max_num_voxels]] = True
        new_id = torch.cumsum(kept.long(), 0) - 1
        M = int(kept.sum())
        pc_voxel_id = torch.full((N,), -1, dtype=torch.int64, device=dev)
        pc_voxel_id[pts] = torch.where(kept[inv], new_id[inv], -1)
        # slot of each point inside its voxel: its rank among the voxel's points in input order
        pv = pc_voxel_id[pts]
        ok = pv >= 0
        pts, pv = pts[ok], pv[ok]
        order = torch.argsort(pv, stable=True)
        counts = torch.bincount(pv, minlength=M)
        start = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(pv)
        slot[order] = torch.arange(pv.shape[0], device=dev) - start[pv[order]]
        fits = slot < P
        voxels = pc.new_zeros((M, P, F))
        voxels[pv[fits], slot[fits]] = pc[pts[fits]]
        num_points = counts.clamp(max=P).to(torch.int32)
        if empty_mean and M:
            mean = voxels.sum(1) / num_points.clamp(min=1)[:, None].to(pc.dtype)
            empty = torch.arange(P, device=dev)[None, :] >= num_points[:, None]
            voxels = torch.where(empty[..., None], mean[:, None, :], voxels)
        rest, coords = uniq[kept], []
        for a in range(D):
            coords.append(rest % grid[a])
            rest = rest // grid[a]
        indices = torch.stack(coords[::-1], 1).to(torch.int32).reshape(-1, D)  # z, y, x
        return voxels, indices, num_points, pc_voxel_id


def gather_features_by_pc_voxel_id(seg_res_features: torch.Tensor, pc_voxel_id: torch.Tensor,
                                   invalid_value=0) -> torch.Tensor:
    """Per-point values ``(N, *rest)`` from per-voxel ones ``(M, *rest)`` (features ``(M, C)``, labels
    ``(M,)``, ...): ``seg_res_features[pc_voxel_id]``, ``invalid_value`` where the id is -1 (a number,
    or a tensor that broadcasts to ``rest``, e.g. one value per channel). As in spconv, the ids move
    to the features' device."""
    _checks.tensor("seg_res_features", seg_res_features)
    _checks.index_tensor("pc_voxel_id", pc_voxel_id, 1)
    if seg_res_features.dim() < 1:
        raise ValueError("seg_res_features must have shape (M, ...) (one row per voxel), got a 0-d tensor")
    pc_voxel_id = pc_voxel_id.to(seg_res_features.device)
    M, rest = seg_res_features.shape[0], tuple(seg_res_features.shape[1:])
    if pc_voxel_id.numel() and not (-1 <= int(pc_voxel_id.min()) and int(pc_voxel_id.max()) < M):
        raise ValueError(f"pc_voxel_id must be < {M} (the number of voxels) and >= -1 (-1: no voxel), got values "
                         f"in [{int(pc_voxel_id.min())}, {int(pc_voxel_id.max())}]")
    if isinstance(invalid_value, torch.Tensor):
        try:
            fits = torch.broadcast_shapes(invalid_value.shape, rest) == rest
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"invalid_value must be a number or a tensor that broadcasts to {rest} (a voxel's "
                             f"values), got shape {tuple(invalid_value.shape)}")
    elif isinstance(invalid_value, bool) or not isinstance(invalid_value, numbers.Real):
        raise TypeError(f"invalid_value must be a number, got {type(invalid_value).__name__}")
    elif not seg_res_features.is_floating_point() and not seg_res_features.is_complex():
        # integer (or bool) labels: a value they hold exactly, not one wrapped or truncated
        dtype = seg_res_features.dtype
        lo, hi = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
        if not (math.isfinite(invalid_value) and invalid_value == int(invalid_value) and lo <= invalid_value <= hi):
            raise ValueError(f"invalid_value must be an integer in [{lo}, {hi}] for {dtype} values, got "
                             f"{invalid_value}")
    valid = (pc_voxel_id >= 0).view(-1, *[1] * len(rest))
    out = seg_res_features.index_select(0, pc_voxel_id.clamp(min=0).long()) if M else \
        seg_res_features.new_zeros((pc_voxel_id.shape[0], *rest))
    fill = torch.as_tensor(invalid_value, dtype=seg_res_features.dtype, device=seg_res_features.device)
    return torch.where(valid, out, fill)
