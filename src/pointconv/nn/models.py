"""PointwiseCNN: the classification network of Hua, Tran and Yeung (CVPR 2018)."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .._dtypes import layer_dtype
from ..conv.pointwise import PointwiseNeighbors, pointwise_neighbors
from .layers import PointwiseConv3d, _check_cloud, _masked_reduce


class PointwiseCNN(nn.Module):
    """Four 3 x 3 x 3 Pointwise convolutions of ``channels`` features with dilations 1, 2, 3, 4 and
    cell size 0.1 (for clouds scaled into the unit sphere), SELU after each, their outputs
    concatenated per point; then global max and mean pooling over the valid points (the authors
    flatten the points in input order instead, which makes the prediction depend on that order)
    and a two-layer classifier.

    ``forward(points (B, N, 3), features=None, lengths=None, neighbors=None) -> (B, num_classes)``
    logits; the input features default to the coordinates. The neighbor structures depend only on
    the points: build them once with ``neighbors(points, lengths)`` and pass them to every forward
    on the same clouds (the authors rebuild them in every forward and backward).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, channels: int = 9, cell_size: float = 0.1,
                 dilations=(1, 2, 3, 4), hidden: int = 64):
        super().__init__()
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.convs = nn.ModuleList()
        if isinstance(dilations, int) or len(dilations) == 0:
            raise ValueError(f"dilations must be a non-empty sequence (one convolution each), got {dilations!r}")
        cin = in_channels
        for d in dilations:
            self.convs.append(PointwiseConv3d(cin, channels, cell_size, dilation=d))
            cin = channels
        width = 2 * channels * len(self.convs)
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.SELU(), nn.Linear(hidden, num_classes))

    def neighbors(self, points: torch.Tensor, lengths=None) -> list[PointwiseNeighbors]:
        """One neighbor structure per convolution, for these clouds (the convolutions that share a
        cell size share one grid of the points)."""
        out = [None] * len(self.convs)
        for cell_size in dict.fromkeys(conv.cell_size for conv in self.convs):
            at = [k for k, conv in enumerate(self.convs) if conv.cell_size == cell_size]
            built = pointwise_neighbors(points, cell_size, [self.convs[k].dilation for k in at], lengths=lengths)
            for k, nbrs in zip(at, built):
                out[k] = nbrs
        return out

    def forward(self, points, features=None, lengths=None, neighbors=None):
        dtype = self.head[0].weight.dtype
        x = points.to(dtype) if features is None else features  # the coordinates as features: the layer's dtype
        lengths = _check_cloud(points, x, lengths, self.in_channels)
        layer_dtype("features", x, dtype)
        N = points.shape[1]
        if neighbors is None:
            neighbors = self.neighbors(points, lengths)
        if not isinstance(neighbors, (list, tuple)) or len(neighbors) != len(self.convs):
            raise ValueError(f"neighbors must hold {len(self.convs)} structures, one per convolution")
        outs = []
        for conv, nbrs in zip(self.convs, neighbors):
            x = torch.selu(conv(points, x, lengths=lengths, neighbors=nbrs))
            outs.append(x)
        x = torch.cat(outs, -1)[:, None]  # every cloud as one query over its N points
        valid = (torch.arange(N, device=points.device)[None, :] < lengths[:, None])[:, None]
        pooled = [_masked_reduce(x, valid, reduce)[:, 0] for reduce in ("max", "mean")]  # empty clouds: 0
        return self.head(torch.cat(pooled, -1))
