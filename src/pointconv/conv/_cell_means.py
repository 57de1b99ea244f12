"""Pointwise convolution as sparse-matrix products, differentiable to any order.

A ``CellMeans`` matrix ``A`` of shape ``(27 R, R)`` (CSR) maps per-point features ``x (R, C)`` to
per-(point, cell) means ``A x``, viewed ``(R, 27 C)``: row ``p * 27 + c`` holds ``1 / count`` at
the columns of the points in cell ``c`` around point ``p``. The convolution is then

    conv(x, w; A) = (A x).view(R, 27 C_in) @ w        with w (27 C_in, C_out), row c * C_in + i.

Each Pointwise neighbor structure holds two such matrices over the same pairs (center i,
neighbor j, cell c) and the same weights ``1 / count(i, c)``: ``gather`` (row (i, c), column j:
the forward) and ``scatter`` (row (j, c), column i). The adjoint of ``x -> conv(x, w; gather)``
is ``g -> conv(g, w~; scatter)`` with ``w~`` the weight's in/out channels swapped per cell, so
every derivative of the convolution is again a convolution or a weight gradient
``sum_i (A x)_i (x) g_i``: one autograd Function computes both and calls itself in its backward
pass, exact to any order.

On CPU (and for float64 or more than 128 channels anywhere) the products run over blocks of rows,
so the ``(rows, 27 C)`` means of a block stay in cache and memory stays bounded whatever the cloud
size; each output row is summed by one thread in a fixed order (CSR times dense) and the weight
gradient, a sum over all rows, per block on the threads (one torch thread each), blocks added in
order, so results are bitwise the same for any thread count. On the Triton backend two fused kernels (``pointconv.kernels.pointwise``)
compute the same sums without writing the means.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .._backend import backend_for
from .._func_transforms import bilinear_tangent, has_tangent, outside_func_transforms
from .._matmul_precision import autocast_state, in_forward_autocast
from .._threads import map_ordered

# torch warns once per process that CSR tensors are "beta"; the CSR x dense product used here is
# stable and tested, and the warning would only confuse users of pointconv
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

_BLOCK_ELEMENTS = 1 << 20  # (rows x 27 C) means per block: 4 MiB in float32, cache-sized on a CPU
_BLOCK_ELEMENTS_CUDA = 1 << 26  # one launch for most clouds on a GPU
_INT32_MAX = (1 << 31) - 1


def _unchecked_sparse():
    """Sparse tensors built here skip torch's invariant checks (the rows come sorted from the
    search). Said through torch's switch as well as ``check_invariants=False``: torch 2.11 warns
    once per process, about memory errors, at any sparse tensor built while the switch was
    never set, whatever the argument says."""
    return torch.sparse.check_sparse_tensor_invariants(enable=False)


@dataclass
class CellMeans:
    """The ``(27 R, R)`` CSR matrix described in the module docstring. ``count`` holds, per stored
    entry, the size of its (point, cell) mean; values are ``1 / count`` in the features' dtype."""

    crow: torch.Tensor  # (27 R + 1,) int32, or int64 beyond 2^31 entries
    col: torch.Tensor  # (nnz,) same dtype as crow
    count: torch.Tensor  # (nnz,) int32
    num_rows: int  # R
    _values: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def from_sorted(rows: torch.Tensor, col: torch.Tensor, num_rows: int,
                    count: torch.Tensor | None = None) -> "CellMeans":
        """Entries sorted by row (``point * 27 + cell``, ``(nnz,)``), then column: their rows,
        columns and mean denominators ``count`` (None: the size of each entry's own row)."""
        itype = torch.int32 if max(col.numel(), 27 * num_rows) <= _INT32_MAX else torch.int64
        # row pointers of sorted row indices: the conversion torch's own to_sparse_csr runs (one pass,
        # no (27 R,) histogram in int64)
        crow = torch._convert_indices_from_coo_to_csr(rows, 27 * num_rows, out_int32=itype == torch.int32)
        if count is None:
            count = (crow[1:] - crow[:-1]).index_select(0, rows)
        return CellMeans(crow, col.to(itype), count.to(torch.int32), num_rows)

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @outside_func_transforms
    def values(self, dtype: torch.dtype) -> torch.Tensor:
        """``1 / count`` in ``dtype`` (cached: the structure is reused by every layer and step)."""
        if dtype not in self._values:
            self._values[dtype] = torch.reciprocal(self.count.to(dtype))
        return self._values[dtype]

    def blocks(self, channels: int) -> list:
        """Consecutive row blocks ``(r0, r1, a, b)`` (points ``r0 .. r1``, their entries ``a .. b``)
        whose ``(rows, 27 C)`` means hold about ``_BLOCK_ELEMENTS`` values."""
        cap = _BLOCK_ELEMENTS_CUDA if self.crow.is_cuda else _BLOCK_ELEMENTS
        step = max(1, cap // (27 * max(channels, 1)))
        bounds = self.crow[:: 27 * step].tolist() + [int(self.crow[-1])]
        return [(r0, min(self.num_rows, r0 + step), bounds[k], bounds[k + 1])
                for k, r0 in enumerate(range(0, self.num_rows, step))]

    def means(self, x: torch.Tensor, block, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(A x)`` of one block's rows, viewed ``(r1 - r0, 27 C)``, written into ``out`` (a buffer
        of at least that many values) or a new tensor."""
        r0, r1, a, b = block
        channels = x.shape[1]
        crow = self.crow[27 * r0: 27 * r1 + 1] - a
        values = self.values(x.dtype)
        with _unchecked_sparse():
            S = torch.sparse_csr_tensor(crow, self.col[a:b], values[a:b], (27 * (r1 - r0), self.num_rows),
                                        check_invariants=False)
        means = x.new_empty((27 * (r1 - r0), channels)) if out is None else out[: 27 * (r1 - r0)]
        torch.addmm(means, S, x, beta=0, out=means)
        return means.view(r1 - r0, 27 * channels)

    def block_means(self, x: torch.Tensor):
        """``(r0, r1, (A x)[27 r0 : 27 r1].view(r1 - r0, 27 C))`` over consecutive row blocks. Every
        block is computed into one buffer, valid until the next block: ``A @ x`` would allocate,
        zero and copy a fresh result per block, which costs more than the product itself."""
        blocks = self.blocks(x.shape[1])
        buffer = x.new_empty((27 * max(r1 - r0 for r0, r1, _, _ in blocks), x.shape[1])) if blocks else None
        for block in blocks:
            yield block[0], block[1], self.means(x, block, buffer)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in, 3, 3, 3)`` indexed ``[o, i, cx, cy, cz]`` -> ``(27 C_in, C_out)``, row ``c * C_in + i``
    with ``c = (cx * 3 + cy) * 3 + cz``."""
    cout, cin = weight.shape[:2]
    return weight.reshape(cout, cin, 27).permute(2, 1, 0).reshape(27 * cin, cout)


def _swap_channels(w: torch.Tensor, cin: int) -> torch.Tensor:
    """``(27 C_in, C_out)`` -> ``(27 C_out, C_in)``: the adjoint's weight, channels swapped per cell."""
    return w.reshape(27, cin, w.shape[1]).transpose(1, 2).reshape(27 * w.shape[1], cin)


def _use_triton(x: torch.Tensor, *channels: int) -> bool:
    """Whether the Triton kernels (``pointconv.kernels.pointwise``: float32, up to 128 channels)
    take this call; the row-block path above takes the rest (float64, wide layers)."""
    if backend_for(x.device) != "triton" or x.dtype != torch.float32:
        return False
    from ..kernels.pointwise import MAX_CHANNELS  # imported only on the Triton backend
    return max(channels) <= MAX_CHANNELS


def _conv(x, w, A: CellMeans):
    cin = x.shape[1]
    if _use_triton(x, cin, w.shape[1]):
        from ..kernels.pointwise import cell_conv
        return cell_conv(A.crow, A.col, A.values(torch.float32), x, w)
    out = x.new_empty((A.num_rows, w.shape[1]))
    w = _column_major(w)
    for r0, r1, means in A.block_means(x):
        torch.mm(means, w, out=out[r0:r1])
    return out


def _column_major(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the same values stored column by column. The right factor of the row-block GEMMs
    is narrow (C_out columns): MKL multiplies by it 2-3x faster in this layout (measured on
    (4315, 243) x (243, 9): 0.81 ms row-major, 0.35 ms column-major)."""
    return w.t().contiguous().t()


def _weight_grad(x, g, A: CellMeans):
    cin = x.shape[1]
    if _use_triton(x, cin, g.shape[1]):
        from ..kernels.pointwise import cell_weight_grad
        return cell_weight_grad(A.crow, A.col, A.values(torch.float32), x, g)
    # transposed, (C_out, 27 C_in): g^T M runs several times faster than M^T g (the same
    # narrow-factor effect as in _conv)
    def term(block):
        return g[block[0]:block[1]].t() @ A.means(x, block)

    return _sum_in_order(_block_terms(term, A.blocks(cin), x), (g.shape[1], 27 * cin), x).t().contiguous()


def _conv_grads(x, w, g, At: CellMeans):
    """Both gradients of ``conv(x, w; A)`` from one pass over the adjoint's means ``T = At g``:
    ``grad x = conv(g, w~; At)`` and ``grad w = sum_j x_j (x) T_j`` (rearranged per cell)."""
    cin, cout = x.shape[1], g.shape[1]
    w_adj = _column_major(_swap_channels(w, cin))
    gx = x.new_empty(x.shape)

    def term(block):
        r0, r1 = block[:2]
        T = At.means(g, block)
        torch.mm(T, w_adj, out=gx[r0:r1])  # rows of its own
        return x[r0:r1].t() @ T

    gw = _sum_in_order(_block_terms(term, At.blocks(cout), x), (cin, 27 * cout), x)
    return gx, gw.view(cin, 27, cout).transpose(0, 1).reshape(27 * cin, cout)


def _block_terms(term, blocks, x):
    """``[term(block) for block in blocks]``, on the threads (``_threads``: one torch thread each).
    A weight gradient sums over rows: one GEMM split over threads by MKL would add its terms in an
    order that depends on the thread count; a block per thread, summed in block order, does not."""
    return map_ordered(term, blocks, x.device) if x.device.type == "cpu" else [term(b) for b in blocks]


def _sum_in_order(terms, shape, like):
    out = like.new_zeros(shape)
    for t in terms:
        out += t
    return out


def pointwise_linear(x, w, mats):
    """``(A x).view(R, 27 C_in) @ w`` with ``A = mats.gather``, differentiable to any order; the
    adjoint ``mats.scatter`` is read only when a derivative needs it (it may be built lazily)."""
    return _Bilinear.apply("conv", x, w, mats, False)


def _matrix(mats, adjoint: bool) -> CellMeans:
    return mats.scatter if adjoint else mats.gather


class _Bilinear(torch.autograd.Function):
    """The two bilinear maps, ``"conv"``: ``(x, w) -> (A x) w`` and ``"weight_grad"``: ``(x, g) ->
    sum_i (A x)_i (x) g_i`` ``(27 C_in, C_out)``, with ``A`` = ``mats.gather``, or ``mats.scatter``
    when ``adjoint``. Every derivative of either is again one of them."""

    @staticmethod
    def forward(mode, x, y, mats, adjoint):
        compute = _conv if mode == "conv" else _weight_grad
        return compute(x.contiguous(), y.contiguous(), _matrix(mats, adjoint))

    @staticmethod
    def setup_context(ctx, inputs, output):  # (apart from forward: torch.func.grad can transform it)
        mode, x, y, mats, adjoint = inputs
        ctx.save_for_backward(x, y)
        ctx.save_for_forward(x, y)
        ctx.mode, ctx.mats, ctx.adjoint = mode, mats, adjoint
        ctx.autocast = autocast_state(x.device)

    @staticmethod
    @in_forward_autocast
    def jvp(ctx, _, x_t, y_t, __, ___):
        x, y = ctx.saved_tensors
        return bilinear_tangent(lambda u, v: _Bilinear.apply(ctx.mode, u, v, ctx.mats, ctx.adjoint), x, y, x_t, y_t)

    @staticmethod
    @in_forward_autocast
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        mats, same, other = ctx.mats, ctx.adjoint, not ctx.adjoint
        need_x, need_y = ctx.needs_input_grad[1:3]
        cin = x.shape[1]
        if ctx.mode == "conv":  # y = w, grad = g
            # (not for forward-mode duals: its out= products refuse them)
            one_pass = not torch.is_grad_enabled() and not any(has_tangent(t) for t in (x, y, grad))
            if need_x and need_y and one_pass and not _use_triton(x, cin, y.shape[1]):
                return (None, *_conv_grads(x, y, grad.contiguous(), _matrix(mats, other)), None, None)  # one pass
            gx = _Bilinear.apply("conv", grad, _swap_channels(y, cin), mats, other) if need_x else None
            gy = _Bilinear.apply("weight_grad", x, grad, mats, same) if need_y else None
        else:  # y = g, grad = h (a weight's shape)
            gx = _Bilinear.apply("conv", y, _swap_channels(grad, cin), mats, other) if need_x else None
            gy = _Bilinear.apply("conv", x, grad, mats, same) if need_y else None
        return None, gx, gy, None, None
