"""``SparseConvTensor``: spconv 2.x's sparse voxel tensor.

``features (N, C)``; ``indices`` int32 ``(N, 1 + ndim)``, rows ``[batch, d0, d1, ...]``;
``spatial_shape`` (ndim ints); ``batch_size``. ``indice_dict`` maps an ``indice_key`` to the kernel
map a layer built, so later layers with the same key reuse it (and inverse convolutions find the
sites they map back to). Tensors made by ``replace_feature`` share the dict.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from .. import _device_transfers as transfers
from .kernel_map import INT32_MAX, linearize


def _feature_tensor(name: str, value, n: int) -> torch.Tensor:
    """New features for ``n`` sites: a ``(n, C)`` tensor."""
    _checks.tensor(name, value)
    if value.dim() != 2 or value.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n}, C) (one row per site), got shape {tuple(value.shape)}")
    return value


def has_duplicate_sites(indices: torch.Tensor, spatial_shape, batch_size: int) -> bool:
    """Whether two rows of ``indices (N, 1 + ndim)`` are the same site: a sort of the linear keys
    (of the rows themselves when the grid has more cells than int64 keys can number)."""
    if indices.shape[0] < 2:
        return False
    if batch_size * math.prod(spatial_shape) <= 2**63:
        keys = torch.sort(linearize(indices[:, 0], indices[:, 1:], spatial_shape)).values
        return bool((keys[1:] == keys[:-1]).any())
    return torch.unique(indices, dim=0).shape[0] < indices.shape[0]


class SparseConvTensor:
    def __init__(self, features, indices, spatial_shape, batch_size, grid=None, voxel_num=None,
                 indice_dict=None, benchmark=False, permanent_thrust_allocator=False, enable_timer=False,
                 force_algo=None):
        _checks.tensor("features", features)
        _checks.tensor("indices", indices)
        if features.dim() != 2:
            raise ValueError(f"features must have shape (N, C), got shape {tuple(features.shape)}")
        if indices.dtype != torch.int32:
            raise TypeError(f"indices must be an int32 tensor, got dtype {indices.dtype}")
        if (isinstance(spatial_shape, (str, bytes)) or not hasattr(spatial_shape, "__iter__")
                or isinstance(spatial_shape, torch.Tensor) and spatial_shape.dim() == 0):
            raise TypeError(f"spatial_shape must be a list of ints, got {type(spatial_shape).__name__}")
        # ints (a float tensor's elements have __index__ too: int() would truncate 4.9 to 4)
        spatial_shape = [_checks.integer("spatial_shape", s) for s in spatial_shape]
        ndim = len(spatial_shape)
        if ndim < 1 or any(s < 1 for s in spatial_shape):
            raise ValueError(f"spatial_shape must hold >= 1 positive sizes, got {spatial_shape}")
        if any(s > INT32_MAX for s in spatial_shape):  # sizes and coordinates are int32, as in spconv
            raise ValueError(f"spatial_shape sizes must be at most 2**31 - 1 (int32 indices), got {spatial_shape}")
        if indices.dim() != 2 or indices.shape[1] != 1 + ndim or indices.shape[0] != features.shape[0]:
            raise ValueError(f"indices must have shape ({features.shape[0]}, {1 + ndim}) (batch first), "
                             f"got shape {tuple(indices.shape)}")
        if indices.device != features.device:
            raise ValueError(f"indices is on {indices.device} but features is on {features.device}")
        batch_size = _checks.integer("batch_size", batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if indices.shape[0]:
            # the bounds of every column in one read (each read waits for the device)
            bounds = transfers.host_ints(torch.stack([indices.amin(0), indices.amax(0)]))
            lo, hi = bounds[:1 + ndim], bounds[1 + ndim:]
            if min(lo) < 0:
                raise ValueError("indices must be non-negative (batch and coordinates)")
            if hi[0] >= batch_size:
                raise ValueError(f"indices has batch id {hi[0]} but batch_size is {batch_size}")
            for d, s in enumerate(spatial_shape):
                if hi[1 + d] >= s:
                    raise ValueError(f"indices has coordinate {hi[1 + d]} on axis {d}, outside "
                                     f"spatial_shape {spatial_shape}")
        self._set(features, indices, spatial_shape, batch_size, indice_dict, benchmark)
        self.grid = grid
        self.voxel_num = voxel_num
        self.force_algo = force_algo

    @classmethod
    def _from_layer(cls, features, indices, spatial_shape, batch_size, indice_dict, benchmark) -> "SparseConvTensor":
        """A layer's output on sites its kernel map made (an inverse conv's: the input sites of the
        conv it inverts): in the grid and unique by construction, their batches within
        ``batch_size`` (checked by the inverse conv against its map), so not checked again (the
        checks read the device)."""
        out = cls.__new__(cls)
        out._set(features, indices, list(spatial_shape), batch_size, indice_dict, benchmark)
        return out

    def _set(self, features, indices, spatial_shape, batch_size, indice_dict, benchmark):
        self._features = features
        self.indices = indices
        self.spatial_shape = spatial_shape
        self.batch_size = batch_size
        self.indice_dict = {} if indice_dict is None else indice_dict
        self.benchmark = benchmark
        # spconv's other public attributes, for code that reads them (nothing here uses them)
        self.grid = self.voxel_num = self.force_algo = None
        self.benchmark_record = {}
        self.thrust_allocator = None
        self.int8_scale = None

    @property
    def features(self) -> torch.Tensor:
        return self._features

    @features.setter
    def features(self, value: torch.Tensor) -> None:
        self._features = _feature_tensor("features", value, self.indices.shape[0])

    @property
    def is_quantized(self) -> bool:
        """spconv's: int8-quantized features (``torch.qint8``; pointconv computes in float only)."""
        return self._features.dtype == torch.qint8

    @property
    def spatial_size(self) -> int:
        return math.prod(self.spatial_shape)

    @property
    def ndim(self) -> int:
        return len(self.spatial_shape)

    def replace_feature(self, feature: torch.Tensor) -> "SparseConvTensor":
        """A tensor with the same sites (and kernel maps) and new features ``(N, C')``."""
        feature = _feature_tensor("feature", feature, self.indices.shape[0])
        out = SparseConvTensor.__new__(SparseConvTensor)
        out.__dict__.update(self.__dict__)
        out._features = feature
        return out

    def shadow_copy(self) -> "SparseConvTensor":
        """A new tensor object with the same features, sites and (shared) kernel maps."""
        return self.replace_feature(self.features)

    def select_by_index(self, valid_indices: torch.Tensor) -> "SparseConvTensor":
        """The sites ``valid_indices`` picks (a bool mask or row indices, as for ``features[...]``).

        The result gets an empty ``indice_dict``: the kernel maps were built for the old sites.
        (spconv 2.3.8 clears the dict it shares with ``self``, dropping ``self``'s maps too.)
        """
        n = self.indices.shape[0]
        _checks.tensor("valid_indices", valid_indices)
        if valid_indices.dtype == torch.bool:
            if valid_indices.shape != (n,):
                raise ValueError(f"valid_indices as a mask must have shape ({n},), got {tuple(valid_indices.shape)}")
        else:
            valid_indices = _checks.index_tensor("valid_indices", valid_indices, 1)
            if valid_indices.numel() and not (-n <= int(valid_indices.min()) and int(valid_indices.max()) < n):
                raise ValueError(f"valid_indices must lie in [-{n}, {n - 1}] (the tensor's {n} sites)")
        out = self.replace_feature(self.features)
        out._features = self.features[valid_indices]
        out.indices = self.indices[valid_indices]
        out.indice_dict = {}
        return out

    def minus(self) -> "SparseConvTensor":
        """The same sites with negated features."""
        return self.replace_feature(-self.features)

    def _features_of(self, other) -> torch.Tensor:
        """``other``'s features for a site-wise sum: a tensor that broadcasts to our ``(N, C)`` features
        (``(N, C)``, ``(C,)``, a scalar, as torch's ``+``), or a SparseConvTensor with our sites and C."""
        if isinstance(other, SparseConvTensor):
            if other.indices is not self.indices and (other.indices.shape != self.indices.shape
                                                      or not torch.equal(other.indices, self.indices)):
                raise ValueError("SparseConvTensors added with + must have the same sites in the same order "
                                 "(use pointconv.sparse.functional.sparse_add for different sites)")
            if other.features.shape != self.features.shape:
                raise ValueError(f"SparseConvTensors added with + must have the same channels, got features of "
                                 f"shape {tuple(self.features.shape)} and {tuple(other.features.shape)}")
            return other.features
        if isinstance(other, torch.Tensor):
            shape = tuple(self.features.shape)
            try:
                fits = torch.broadcast_shapes(other.shape, shape) == shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"a tensor added to a SparseConvTensor must broadcast to its features' shape "
                                 f"{shape} (N sites, C channels), got shape {tuple(other.shape)}")
            return other
        raise TypeError(f"can only add a SparseConvTensor or a torch.Tensor, got {type(other).__name__}")

    def __add__(self, other) -> "SparseConvTensor":
        """Site-wise sum with a tensor of the same sites (spconv's ``+``, which does not check them)."""
        return self.replace_feature(self.features + self._features_of(other))

    __radd__ = __add__

    def __iadd__(self, other) -> "SparseConvTensor":
        # out of place on the features: an in-place add could modify a tensor autograd saved
        self.features = self.features + self._features_of(other)
        return self

    def find_indice_pair(self, key):
        return self.indice_dict.get(key) if key is not None else None

    def dense(self, channels_first: bool = True) -> torch.Tensor:
        """``(B, C, *spatial)`` (or channels last ``(B, *spatial, C)``); inactive sites are zero.
        Raises on duplicate sites, which would otherwise silently keep one of their features."""
        _checks.flag("channels_first", channels_first)
        C = self.features.shape[1]
        if self.batch_size * self.spatial_size * C * self.features.element_size() >= 2**62:
            raise ValueError(f"dense() would hold {self.batch_size} x {self.spatial_shape} x {C} elements: more "
                             "bytes than one tensor can address")
        if has_duplicate_sites(self.indices, self.spatial_shape, self.batch_size):  # O(N log N) < O(grid)
            raise ValueError("indices has duplicate sites (the same batch and coordinates twice): dense() "
                             "has one cell per site")
        # one grid, in its final layout, written in place (the grid written out of place and then
        # made channels first held three grids' worth of memory at once)
        if channels_first:
            out = self.features.new_zeros((self.batch_size, C, *self.spatial_shape))
            cells = out.movedim(1, -1)  # (B, *spatial, C), a view
        else:
            out = cells = self.features.new_zeros((self.batch_size, *self.spatial_shape, C))
        # sites are unique: no accumulation needed
        cells.index_put_(tuple(self.indices.long().unbind(1)), self.features)
        return out

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "SparseConvTensor":
        """From a channels-last dense tensor ``(B, *spatial, C)``: every site with a nonzero channel."""
        _checks.tensor("x", x)
        if x.dim() < 3:
            raise ValueError(f"x must have shape (B, *spatial, C), got shape {tuple(x.shape)}")
        active = (x != 0).any(-1)
        idx = torch.nonzero(active).to(torch.int32)
        return cls(x[active], idx, list(x.shape[1:-1]), x.shape[0])

    def __repr__(self) -> str:
        return (f"SparseConvTensor(N={self.indices.shape[0]}, C={self.features.shape[1]}, "
                f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size})")


def check_layer_input(x, ndim: int | None = None) -> SparseConvTensor:
    """What every sparse layer asks of its input: a SparseConvTensor (of ``ndim`` spatial dimensions)
    with floating-point features (integer ones would cast the weights to integers)."""
    if not isinstance(x, SparseConvTensor):
        raise TypeError(f"input must be a SparseConvTensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"input has {x.ndim} spatial dimensions, this layer {ndim}")
    if not x.features.is_floating_point():
        raise TypeError(f"input features must be floating point, got dtype {x.features.dtype}")
    return x
