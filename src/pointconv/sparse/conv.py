"""Sparse convolutions with spconv 2.x's API and the dense convolution's math (DESIGN.md 5.3).

A convolution is ``out[out_rows] += x[in_rows] @ W[o]^T`` over the pairs of each kernel offset o.
On CPU (torch backend) the tiled pair products of ``_pair_gemm`` compute it, on CUDA (Triton
backend) the implicit GEMM of ``_implicit_gemm`` (each output row written by one program); both
through the bilinear autograd Function of ``_bilinear``: exact gradients w.r.t. features and
weights to any order, deterministic. Grouped convolutions, CUDA's torch backend and the reference
backend run ``apply_kernel_map_ops``: plain differentiable torch ops per offset (index_select,
matmul, ``_row_sums.add_rows_``: ``index_add_`` on CPU, ``index_put_(accumulate=True)`` on CUDA, deterministic under
``torch.use_deterministic_algorithms``), the reference the fast paths are tested against.
Under ``torch.autocast`` the layers compute float32 features in the region's dtype, fp16 or bf16
(spconv always casts to fp16), summing over kernel offsets in float32; float64 stays float64.

Weights are ``(out, k0, ..., k_{n-1}, in / groups)`` as in spconv 2.x, so its state_dicts load
unchanged. A kernel of size 1 follows the dense math (spconv's own 1x1 path multiplies with
``weight.view(in, out)``, which scrambles the channels: we do not reproduce that).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks
from .._backend import backend_for
from .._dtypes import accumulation_dtype, layer_dtype
from .._row_sums import add_rows_
from ._bilinear import bilinear_conv
from ._implicit_gemm import use_triton
from .kernel_map import KernelMap, build_conv, build_subm, build_transposed, inverse_of, transposed_output_shape
from .modules import SparseModule, VoxelCountRecorder
from .tensor import SparseConvTensor, check_layer_input


def _tuple(name, v, ndim):
    """An int or ``ndim`` ints (list or tuple; numpy ints too) as a tuple. Floats, bools and strings
    raise a TypeError: ``int(2.5)`` would silently make a kernel of 2."""
    vals = list(v) if isinstance(v, (tuple, list)) else [v] * ndim
    if len(vals) != ndim:
        raise ValueError(f"{name} must be an int or {ndim} ints, got {v!r}")
    return tuple(_checks.integer(name, x) for x in vals)


def compute_dtype(features: torch.Tensor) -> torch.dtype:
    """The features' dtype, or autocast's (fp16 or bf16) for float32 features inside an autocast
    region of their device (autocast leaves float64 alone, as torch's own layers do)."""
    dev = features.device.type
    if torch.is_autocast_enabled(dev) and features.dtype == torch.float32:
        return torch.get_autocast_dtype(dev)
    return features.dtype


def check_key_unused(key, cached, subm: bool, kernel_size=None, dilation=None) -> None:
    """spconv's rules for an ``indice_key`` already in the input's ``indice_dict`` (``cached``: its
    kernel map): a strided or transposed convolution or a pool needs a key of its own (its map
    would replace the one an inverse convolution needs); a submanifold convolution shares only a
    submanifold convolution's key, with the same kernel size and dilation."""
    if key is None or cached is None:
        return
    if not subm:
        raise ValueError(f"indice_key {key!r} is already in the input's indice_dict: a strided or transposed "
                         "convolution or a pool needs a key of its own")
    if not isinstance(cached, KernelMap) or not cached.subm:
        raise ValueError(f"indice_key {key!r} belongs to a strided or transposed convolution or a pool; a "
                         "submanifold convolution can only share a submanifold convolution's key")
    for what, there, here in (("kernel_size", cached.kernel_size, kernel_size), ("dilation", cached.dilation, dilation)):
        if tuple(there) != tuple(here):
            raise ValueError(f"submanifold convolutions sharing indice_key {key!r} must have the same {what}: "
                             f"{list(there)} there, {list(here)} here")


def apply_kernel_map(features, weight, kmap: KernelMap, groups: int = 1) -> torch.Tensor:
    """Output features ``(N_out, out)`` of a sparse convolution with kernel map ``kmap``.

    Computes in ``features``' dtype; fp16/bf16 products are summed over kernel offsets in float32
    and rounded once at the end.
    """
    W = weight.reshape(weight.shape[0], len(kmap.start) - 1, weight.shape[-1])
    if use_triton(features, groups):
        return bilinear_conv(features, W.permute(1, 2, 0), kmap.tables())
    if groups == 1 and features.device.type == "cpu" and backend_for(features.device) == "torch":
        return bilinear_conv(features, W.permute(1, 2, 0), kmap.pair_tables())
    return apply_kernel_map_ops(features, W, kmap, groups)


def apply_kernel_map_ops(features, W, kmap: KernelMap, groups: int = 1) -> torch.Tensor:
    """The reference: per kernel offset, gather -> GEMM -> scatter with plain differentiable torch
    ops (``W (out, V, in / groups)``); the path of grouped convolutions, of CUDA's torch backend
    and of the reference backend."""
    out_ch, kvol = W.shape[:2]
    out = features.new_zeros((kmap.out_indices.shape[0], out_ch), dtype=accumulation_dtype(features.dtype))
    # A submanifold kernel's center reads each site itself: one dense GEMM, no gather or scatter.
    center = kmap.identity_offset()
    for o in range(kvol):
        a, b = kmap.start[o], kmap.start[o + 1]
        if a == b:
            continue
        if o == center:
            out = out + _offset_matmul(features, W[:, o], groups).to(out.dtype)
            continue
        src = features.index_select(0, kmap.in_rows[a:b])
        # in place: ``out`` is a fresh accumulator no other op saved, so autograd allows it, and an
        # out-of-place add would copy the whole output once per kernel offset
        out = add_rows_(out, kmap.out_rows[a:b], _offset_matmul(src, W[:, o], groups).to(out.dtype))
    if kmap.start[-1] == 0:
        # no pairs (no input sites, or no output site): zeros that still depend on the inputs, so
        # their gradients are zeros rather than missing (sums of empty slices: 0, whatever the values)
        out = out + (features[:0].sum() + W[:0].sum()).to(out.dtype)
    return out.to(features.dtype)


def _added_features(add_input, out_indices, channels) -> torch.Tensor:
    """The features of a convolution's ``add_input``, which must hold the output's sites in the
    output's order (the indices tensor itself, or equal to it: one read of the device)."""
    if not isinstance(add_input, SparseConvTensor):
        raise TypeError(f"add_input must be a SparseConvTensor, got {type(add_input).__name__}")
    if add_input.features.shape[1] != channels:
        raise ValueError(f"add_input has {add_input.features.shape[1]} channels, the output {channels}")
    same = add_input.indices is out_indices or (add_input.indices.shape == out_indices.shape
                                                and torch.equal(add_input.indices, out_indices))
    if not same:
        raise ValueError("add_input must have the output's sites, in the output's order")
    return add_input.features


def _offset_matmul(src, w, groups):
    """``src (m, in) -> (m, out)`` through one kernel offset's weight ``w (out, in / groups)``."""
    if groups == 1:
        return src @ w.t()
    out_ch, in_g = w.shape
    return torch.einsum("mgi,goi->mgo", src.view(-1, groups, in_g),
                        w.view(groups, out_ch // groups, in_g)).reshape(-1, out_ch)


_ACTIVATIONS = {
    "None_": lambda x, alpha: x,
    "ReLU": lambda x, alpha: torch.relu(x),
    "Sigmoid": lambda x, alpha: torch.sigmoid(x),
    "LeakyReLU": lambda x, alpha: torch.nn.functional.leaky_relu(x, alpha),
}


class SparseConvolution(VoxelCountRecorder, SparseModule):
    """Common base of SubMConvNd and SparseConvNd (spconv's ``SparseConvolution``)."""

    def __init__(self, ndim, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, subm=False, output_padding=0, transposed=False, inverse=False,
                 indice_key=None, algo=None, fp32_accum=None, record_voxel_count=False, act_type=None,
                 act_alpha=0, act_beta=0, large_kernel_fast_algo=False, name=None, device=None, dtype=None):
        super().__init__(name=name)
        in_channels = _checks.positive_int("in_channels", in_channels)
        out_channels = _checks.positive_int("out_channels", out_channels)
        groups = _checks.positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        if inverse and indice_key is None:
            raise ValueError("an inverse convolution needs the indice_key of the convolution it inverts")
        self.ndim = ndim
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _tuple("kernel_size", kernel_size, ndim)
        self.stride = _tuple("stride", stride, ndim)
        self.padding = _tuple("padding", padding, ndim)
        self.dilation = _tuple("dilation", dilation, ndim)
        for name_, vals, low in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                                 ("dilation", self.dilation, 1), ("padding", self.padding, 0)):
            if any(v < low for v in vals):
                raise ValueError(f"{name_} must be >= {low}, got {list(vals)}")
        self.subm = subm
        if subm and any(s != 1 for s in self.stride):
            raise ValueError(f"a submanifold convolution has stride 1, got {list(self.stride)}")
        self.output_padding = _tuple("output_padding", output_padding, ndim)
        if transposed and any(not 0 <= op < max(s, d) for op, s, d in
                              zip(self.output_padding, self.stride, self.dilation)):
            # torch's ConvTranspose rule: a larger padding would add output rows no input reaches
            raise ValueError(f"output_padding must be >= 0 and smaller than stride or dilation, got "
                             f"{list(self.output_padding)} with stride {list(self.stride)} and dilation "
                             f"{list(self.dilation)}")
        self.transposed, self.inverse = transposed, inverse
        self.indice_key = indice_key
        self.algo = algo
        self.fp32_accum = fp32_accum  # (spconv's; fp16 / bf16 products are always summed in float32 here)
        # spconv's fused activation (its cumm Activation enum, or the name): applied after the bias
        self.act_type = "None_" if act_type is None else getattr(act_type, "name", str(act_type))
        if self.act_type not in _ACTIVATIONS:
            raise ValueError(f"act_type must be one of {sorted(_ACTIVATIONS)} (spconv's Activation), got {act_type!r}")
        for arg, value in (("act_alpha", act_alpha), ("act_beta", act_beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{arg} must be a number, got {type(value).__name__}")
        self.act_alpha, self.act_beta = float(act_alpha), float(act_beta)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_channels, *self.kernel_size, in_channels // groups), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._init_voxel_count(record_voxel_count and not subm and not inverse, device)
        # spconv's ``conv1x1``: one tap that leaves every site where it is (a submanifold kernel, or
        # stride 1 without padding) is a product per site; see ``_per_site``
        self.conv1x1 = math.prod(self.kernel_size) == 1 and (
            subm or (all(v == 1 for v in self.stride) and not any(self.padding)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch's Conv default, kaiming_uniform(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        # fan_in = in/groups * prod(kernel); the bias takes the same bound.
        fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _kernel_map(self, x: SparseConvTensor, indice_dict: dict | None = None) -> KernelMap:
        """The kernel map for ``x``: reused or built; a new one goes into ``indice_dict`` (the
        output's copy of the input's dict, as in spconv; None: kept nowhere) under ``indice_key``."""
        cached = x.find_indice_pair(self.indice_key)
        if self.inverse:
            if not isinstance(cached, KernelMap) or cached.subm:
                raise ValueError(f"no strided convolution with indice_key {self.indice_key!r} ran before this "
                                 "inverse convolution")
            if cached.kernel_size != self.kernel_size:
                raise ValueError(f"the convolution with indice_key {self.indice_key!r} has kernel "
                                 f"{list(cached.kernel_size)}, this inverse convolution {list(self.kernel_size)}")
            same_sites = cached.out_indices is x.indices or (  # (torch.equal reads the device)
                cached.out_indices.shape == x.indices.shape and torch.equal(cached.out_indices, x.indices))
            if not same_sites:
                raise ValueError(f"the input sites are not the outputs of the convolution with indice_key "
                                 f"{self.indice_key!r}")
            if cached.in_batches is not None and cached.in_batches > x.batch_size:
                # (its output sites, that conv's inputs, would hold batch ids past x.batch_size)
                raise ValueError(f"the convolution with indice_key {self.indice_key!r} had inputs in "
                                 f"{cached.in_batches} batches, this inverse convolution's input has batch_size "
                                 f"{x.batch_size}")
            return inverse_of(cached)
        check_key_unused(self.indice_key, cached, self.subm, self.kernel_size, self.dilation)
        if self.subm:
            if cached is not None and cached.out_indices is x.indices:
                return cached
            # (the same key on other sites, e.g. a tensor built anew: spconv would reuse the map of
            # any sites of the same count; we build the right one)
            kmap = build_subm(x.indices, x.spatial_shape, self.kernel_size, self.dilation)
        elif self.transposed:
            kmap = build_transposed(x.indices, x.spatial_shape, self.kernel_size, self.stride, self.padding,
                                    self.dilation, self.output_padding)
        else:
            kmap = build_conv(x.indices, x.spatial_shape, self.kernel_size, self.stride, self.padding,
                              self.dilation)
        if self.indice_key is not None and indice_dict is not None:
            indice_dict[self.indice_key] = kmap
        return kmap

    def is_inverseable(self) -> bool:
        """spconv's: can an inverse convolution undo this one (it records a map under its key)?"""
        return self.indice_key is not None and not self.subm

    def _per_site(self, x: SparseConvTensor) -> bool:
        """Does this layer run as spconv's ``conv1x1``: every output site is its input site, in the
        input's order, and the features are one product per site (the dense math: ``weight``
        ``(out, 1, ..., 1, in / groups)`` as an ``(out, in / groups)`` matrix)? Like spconv, such a
        layer builds no kernel map, so it neither checks nor records its ``indice_key``, and a
        residual ``y.features + x.features`` lines up row by row. An inverse convolution of one tap
        runs so only when no map is recorded under its key (spconv's always does; after a strided
        one-tap convolution that would leave the strided sites, not restore the convolution's input)."""
        if not self.conv1x1:
            return False
        return not self.inverse or x.find_indice_pair(self.indice_key) is None

    def forward(self, x: SparseConvTensor, add_input: SparseConvTensor | None = None) -> SparseConvTensor:
        """``add_input`` (spconv's): a tensor on the output's sites whose features are added before
        the fused activation: ``act(conv(x) + bias + add_input.features)``, as spconv's int8 kernels
        do (its float path computes ``act(act(conv(x) + bias) + add)``: the same without ``act_type``,
        which spconv allows in inference only)."""
        check_layer_input(x, self.ndim)
        if x.features.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.features.shape[1]} channels, this layer expects {self.in_channels}")
        # as torch's and spconv's convolutions (a float64 layer would otherwise round its weights to
        # float32 features, silently), but float32 weights take fp16 / bf16 features (summed in float32)
        layer_dtype("features", x.features, self.weight.dtype, float32_for_half=True)
        indice_dict = dict(x.indice_dict)
        per_site = self._per_site(x)
        kmap = None if per_site else self._kernel_map(x, indice_dict)
        dtype = compute_dtype(x.features)  # under autocast: fp16 or bf16, as the autocast region asks
        if per_site:
            w = self.weight.to(dtype).reshape(self.out_channels, self.in_channels // self.groups)
            feats = _offset_matmul(x.features.to(dtype), w, self.groups)
        else:
            feats = apply_kernel_map(x.features.to(dtype), self.weight.to(dtype), kmap, self.groups)
        if self.bias is not None:
            feats = feats + self.bias.to(feats.dtype)
        out_indices = x.indices if per_site or self.subm else kmap.out_indices
        if add_input is not None:
            feats = feats + _added_features(add_input, out_indices, self.out_channels).to(feats.dtype)
        feats = _ACTIVATIONS[self.act_type](feats, self.act_alpha)
        if self.subm:
            out = x.replace_feature(feats)
            out.indice_dict = indice_dict
            return out
        if not self.inverse:
            self._record_voxel_count(out_indices.shape[0])
        if per_site:
            shape = (transposed_output_shape(x.spatial_shape, self.kernel_size, self.stride, self.padding,
                                             self.dilation, self.output_padding) if self.transposed
                     else x.spatial_shape)
        else:
            shape = kmap.out_spatial_shape
        return SparseConvTensor._from_layer(feats, out_indices, shape, x.batch_size, indice_dict, x.benchmark)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={list(self.kernel_size)}, "
                f"stride={list(self.stride)}, padding={list(self.padding)}, dilation={list(self.dilation)}, "
                f"groups={self.groups}, subm={self.subm}, indice_key={self.indice_key!r}"
                + (f", act={self.act_type}" if self.act_type != "None_" else ""))


def _make(ndim: int, kind: str, name: str):
    flags = {"subm": kind == "submanifold", "transposed": kind == "transposed"}

    # spconv's positional order; its submanifold classes have no record_voxel_count (they keep the
    # input's sites), so there large_kernel_fast_algo comes right after fp32_accum
    if flags["subm"]:
        def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, groups=1,
                     bias=True, indice_key=None, algo=None, fp32_accum=None, large_kernel_fast_algo=False,
                     name=None, device=None, dtype=None):
            SparseConvolution.__init__(self, ndim, in_channels, out_channels, kernel_size, stride, padding,
                                       dilation, groups, bias, indice_key=indice_key, algo=algo,
                                       fp32_accum=fp32_accum, large_kernel_fast_algo=large_kernel_fast_algo,
                                       name=name, device=device, dtype=dtype, **flags)
    else:
        def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, groups=1,
                     bias=True, indice_key=None, algo=None, fp32_accum=None, record_voxel_count=False,
                     large_kernel_fast_algo=False, name=None, device=None, dtype=None, output_padding=0):
            SparseConvolution.__init__(self, ndim, in_channels, out_channels, kernel_size, stride, padding,
                                       dilation, groups, bias, output_padding=output_padding, indice_key=indice_key,
                                       algo=algo, fp32_accum=fp32_accum, record_voxel_count=record_voxel_count,
                                       large_kernel_fast_algo=large_kernel_fast_algo, name=name, device=device,
                                       dtype=dtype, **flags)

    return type(name, (SparseConvolution,), {"__init__": __init__, "__doc__": f"{ndim}-D {kind} sparse convolution."})


def _make_inverse(ndim: int, name: str):
    def __init__(self, in_channels, out_channels, kernel_size, indice_key, bias=True, algo=None, fp32_accum=None,
                 large_kernel_fast_algo=False, name=None, device=None, dtype=None):
        SparseConvolution.__init__(self, ndim, in_channels, out_channels, kernel_size, bias=bias, inverse=True,
                                   indice_key=indice_key, algo=algo, name=name, device=device, dtype=dtype)

    doc = (f"{ndim}-D inverse sparse convolution: maps the outputs of the strided convolution with the same "
           "indice_key back onto its input sites (its stride, padding and dilation are used).")
    return type(name, (SparseConvolution,), {"__init__": __init__, "__doc__": doc})


SubMConv1d = _make(1, "submanifold", "SubMConv1d")
SubMConv2d = _make(2, "submanifold", "SubMConv2d")
SubMConv3d = _make(3, "submanifold", "SubMConv3d")
SubMConv4d = _make(4, "submanifold", "SubMConv4d")
SparseConv1d = _make(1, "regular (strided)", "SparseConv1d")
SparseConv2d = _make(2, "regular (strided)", "SparseConv2d")
SparseConv3d = _make(3, "regular (strided)", "SparseConv3d")
SparseConv4d = _make(4, "regular (strided)", "SparseConv4d")
SparseConvTranspose1d = _make(1, "transposed", "SparseConvTranspose1d")
SparseConvTranspose2d = _make(2, "transposed", "SparseConvTranspose2d")
SparseConvTranspose3d = _make(3, "transposed", "SparseConvTranspose3d")
SparseConvTranspose4d = _make(4, "transposed", "SparseConvTranspose4d")
SparseInverseConv1d = _make_inverse(1, "SparseInverseConv1d")
SparseInverseConv2d = _make_inverse(2, "SparseInverseConv2d")
SparseInverseConv3d = _make_inverse(3, "SparseInverseConv3d")
SparseInverseConv4d = _make_inverse(4, "SparseInverseConv4d")
