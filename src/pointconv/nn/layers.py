"""KNNConv, RadiusConv (PointNet++ set abstraction) and EdgeConv (DGCNN).

Each builds its neighborhoods with pointconv's exact neighbor search, so padded points (beyond
``lengths``) are never neighbors, and reduces over valid neighbors only.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .._dtypes import layer_dtype
from .._graph_zeros import zeros_like_graph
from ..conv.aggregate import aggregate
from ..conv.pointwise import _dilation, pointwise_conv
from ..neighbors import ball_query, gather, knn
from ..neighbors._common import check_magnitude


def _check_cloud(points, features, lengths, in_channels, dim=None):
    _checks.coords("points", points, ndim=3, dim=dim)
    _checks.tensor("features", features)
    if features.dim() != 3 or features.shape[:2] != points.shape[:2]:
        raise ValueError(f"features must have shape ({points.shape[0]}, {points.shape[1]}, C), "
                         f"got {tuple(features.shape)}")
    if features.shape[2] != in_channels:
        raise ValueError(f"features have {features.shape[2]} channels, this layer expects {in_channels}")
    return _checks.lengths("lengths", lengths, points.shape[0], points.shape[1], points.device)


def _masked_reduce(x, valid, reduce):
    """Reduce ``x (B, Q, k, C)`` over valid neighbors; queries without any get zeros."""
    if x.shape[2] == 0:  # no neighbor slots at all (an empty cloud)
        return zeros_like_graph((*x.shape[:2], x.shape[3]), x.dtype, x.device, x)
    if reduce == "max":
        out = x.masked_fill(~valid[..., None], float("-inf")).max(dim=2).values
    else:
        out = (x * valid[..., None].to(x.dtype)).sum(2)
        if reduce == "mean":
            out = out / valid.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
    return torch.where(valid.any(-1, keepdim=True), out, torch.zeros_like(out))


class KNNConv(nn.Module):
    """Reduce the features of the k nearest neighbors (mean / max / sum), then a linear layer."""

    def __init__(self, in_channels: int, out_channels: int, k: int, reduce: str = "mean", exclude_self: bool = True):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.k = _checks.positive_int("k", k)
        if reduce not in ("mean", "max", "sum"):
            raise ValueError(f"reduce must be 'mean', 'max' or 'sum', got {reduce!r}")
        self.reduce, self.exclude_self = reduce, exclude_self
        self.linear = nn.Linear(in_channels, _checks.positive_int("out_channels", out_channels))

    def extra_repr(self) -> str:
        return f"k={self.k}, reduce={self.reduce!r}, exclude_self={self.exclude_self}"

    def forward(self, points, features, lengths=None):
        """``points (B, N, 3)``, ``features (B, N, C_in)`` (the layer's dtype) -> ``(B, N, C_out)``;
        padded rows are 0."""
        lengths = _check_cloud(points, features, lengths, self.in_channels)
        layer_dtype("features", features, self.linear.weight.dtype)
        idx = knn(points.detach(), points.detach(), self.k, query_lengths=lengths, points_lengths=lengths,
                  exclude_self=self.exclude_self).idx
        out = self.linear(aggregate(features, idx, self.reduce))
        rows = torch.arange(points.shape[1], device=points.device)[None, :] < lengths[:, None]
        return out * rows[..., None].to(out.dtype)


class RadiusConv(nn.Module):
    """PointNet++ set abstraction: at each center, the k nearest points within ``radius``, a shared
    MLP on ``[f_j, p_j - p_i]``, then a reduction over the neighbors."""

    def __init__(self, in_channels: int, mlp_channels, radius: float, k: int, reduce: str = "max"):
        super().__init__()
        self.in_channels = _checks.nonneg_int("in_channels", in_channels)
        self.radius = _checks.positive_float("radius", radius)
        self.k = _checks.positive_int("k", k)
        if reduce not in ("mean", "max", "sum"):
            raise ValueError(f"reduce must be 'mean', 'max' or 'sum', got {reduce!r}")
        self.reduce = reduce
        if not isinstance(mlp_channels, (list, tuple)):
            raise TypeError(f"mlp_channels must be a list or tuple of layer widths, got {type(mlp_channels).__name__}")
        chans = [self.in_channels + 3] + [_checks.positive_int("mlp_channels", c) for c in mlp_channels]
        if len(chans) < 2:
            raise ValueError("mlp_channels must name at least one layer")
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, radius={self.radius}, k={self.k}, reduce={self.reduce!r}"

    def forward(self, points, features, centers=None, lengths=None, center_lengths=None):
        """``points (B, N, 3)`` and ``centers (B, M, 3)`` (default: the points) float32 / float64
        coordinates, ``features (B, N, C)`` in the layer's dtype -> ``(B, M, mlp_channels[-1])``;
        the offsets ``p_j - p_i`` enter the MLP in the features' dtype."""
        lengths = _check_cloud(points, features, lengths, self.in_channels, dim=3)
        layer_dtype("features", features, self.mlp[0].weight.dtype)
        if centers is None:
            centers = points
            center_lengths = lengths if center_lengths is None else center_lengths
        else:
            _checks.coords("centers", centers, ndim=3, dim=3)
            check_magnitude("centers", centers)
            _checks.same_device(points=points, centers=centers)
            _checks.same_dtype(points=points, centers=centers)
            if centers.shape[0] != points.shape[0]:
                raise ValueError(f"centers has batch size {centers.shape[0]} but points has {points.shape[0]}")
        center_lengths = _checks.lengths("center_lengths", center_lengths, *centers.shape[:2], centers.device)
        res = ball_query(centers.detach(), points.detach(), self.radius, self.k, query_lengths=center_lengths,
                         points_lengths=lengths)
        valid = res.idx >= 0
        rel = (gather(points, res.idx) - centers[:, :, None, :]).to(features.dtype)
        x = torch.cat([gather(features, res.idx), rel], -1)
        return _masked_reduce(self.mlp(x), valid, self.reduce)


class PointwiseConv3d(nn.Module):
    """Pointwise convolution (Hua et al., CVPR 2018) with a-trous ``dilation``: a 3 x 3 x 3 cell
    kernel of edge ``cell_size`` around each point; see ``pointconv.pointwise_conv``."""

    def __init__(self, in_channels: int, out_channels: int, cell_size: float, dilation: int = 1, bias: bool = False):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        self.cell_size = _checks.positive_float("cell_size", cell_size)
        self.dilation = _dilation(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        bound = 1 / (in_channels * 27) ** 0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, cell_size={self.cell_size}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")

    def forward(self, points, features, lengths=None, neighbors=None):
        """``points (B, N, 3)``, ``features (B, N, C_in)`` -> ``(B, N, C_out)``; pass ``neighbors``
        (``pointconv.conv.pointwise_neighbors``) to share one neighbor structure between layers."""
        _check_cloud(points, features, lengths, self.in_channels, dim=3)
        layer_dtype("features", features, self.weight.dtype)
        return pointwise_conv(points, features, self.weight, self.cell_size, self.dilation, lengths=lengths,
                              bias=self.bias, neighbors=neighbors)


class EdgeConv(nn.Module):
    """DGCNN's edge convolution: kNN in FEATURE space (any dimension), recomputed per call, a shared
    MLP on ``[f_i, f_j - f_i]``, max over the k neighbors (each point is its own nearest, as in DGCNN)."""

    def __init__(self, in_channels: int, out_channels: int, k: int):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.k = _checks.positive_int("k", k)
        self.mlp = nn.Sequential(nn.Linear(2 * in_channels, _checks.positive_int("out_channels", out_channels)),
                                 nn.LeakyReLU(0.2))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, k={self.k}"

    def forward(self, features, lengths=None):
        """``features (B, N, C)`` -> ``(B, N, out_channels)``; padded rows are 0.

        fp16 / bf16 features (a half-precision layer, or the output of the previous EdgeConv under
        autocast) are searched as their exact float32 values: the neighbors of the same numbers."""
        _checks.tensor("features", features)
        if not features.is_floating_point():
            raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
        half = features.dtype in (torch.float16, torch.bfloat16)
        searched = features.detach().float() if half else features.detach()
        _checks.coords("features", searched, ndim=3)
        check_magnitude("features", searched)  # searched as coordinates: their squared distances must be finite
        if features.shape[2] != self.in_channels:
            raise ValueError(f"features have {features.shape[2]} channels, this layer expects {self.in_channels}")
        layer_dtype("features", features, self.mlp[0].weight.dtype)
        lengths = _checks.lengths("lengths", lengths, features.shape[0], features.shape[1], features.device)
        idx = knn(searched, searched, self.k, query_lengths=lengths, points_lengths=lengths).idx
        fi = features[:, :, None, :].expand(-1, -1, self.k, -1)
        x = torch.cat([fi, gather(features, idx) - fi], -1)
        return _masked_reduce(self.mlp(x), idx >= 0, "max")
