"""Sparse convolution on CPU: gather -> GEMM -> scatter per kernel offset, in cache-sized chunks.

``PairTables`` computes the two bilinear products of ``_bilinear`` from the pairs of a kernel map:

    conv(x, w)[out_rows[p]]  += x[in_rows[p]] @ w[o]          (every pair p of offset o)
    weight_grad(x, g)[o]      = sum_p x[in_rows[p]]^T g[out_rows[p]]

one chunk of an offset's pairs at a time, so that the gathered rows and their product stay in
cache between the three steps (whole offsets at once stream each through memory: about 20%
slower on the (a) benchmark's 70K pairs per offset). A submanifold kernel's center offset pairs
every site with itself: one dense product, no gather or scatter. The scatter (``index_add_``) is
sequential on CPU and each chunk's weight-gradient term is added in order: deterministic.
fp16 / bf16 products are summed in float32 and rounded once.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 19  # rows per chunk times the wider channel count: 2 MiB of float32


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where products of ``dtype`` are summed: float32 for fp16 / bf16, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class PairTables:
    """The pairs ``in_rows -> out_rows`` of a kernel map grouped by offset (``start``, as in
    ``KernelMap``), onto ``n_out`` output rows; ``identity``: the offset whose pairs are (i, i) for
    every row, or None. ``transposed``: the same pairs read from the input side."""

    def __init__(self, in_rows, out_rows, start: list[int], n_in: int, n_out: int, identity=None, transposed=None):
        # int32 rows gather faster (index_select), int64 ones scatter faster (index_add_ takes a slow
        # path for int32: 3.7x slower on the (a) benchmark)
        self.in_rows = in_rows.to(torch.int32 if n_in < 1 << 31 else torch.int64)
        self.out_rows = out_rows.long()
        self.start, self.n_in, self.n_out, self.identity = start, n_in, n_out, identity
        self._pairs, self._transposed = (in_rows, out_rows), transposed

    @property
    def transposed(self) -> "PairTables":
        """Built on first use: a forward that needs no feature gradient never builds it."""
        if self._transposed is None:
            in_rows, out_rows = self._pairs
            self._transposed = PairTables(out_rows, in_rows, self.start, self.n_out, self.n_in, self.identity, self)
        return self._transposed

    def _chunks(self, o: int, channels: int):
        step = max(1, _CHUNK_ELEMENTS // max(channels, 1))
        a, b = self.start[o], self.start[o + 1]
        for c in range(a, b, step):
            e = min(b, c + step)
            yield self.in_rows[c:e], self.out_rows[c:e]

    def conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``(n_out, C_out)`` from ``x (n_in, C_in)`` and ``w (V, C_in, C_out)``."""
        acc = accumulation_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = x.new_zeros((self.n_out, w.shape[2]), dtype=acc)
            for o in range(w.shape[0]):
                if o == self.identity:
                    out += x @ w[o]
                    continue
                for rows_in, rows_out in self._chunks(o, max(w.shape[1], w.shape[2])):
                    out.index_add_(0, rows_out, (x.index_select(0, rows_in) @ w[o]).to(acc))
        return out.to(x.dtype)

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``(V, C_in, C_out)`` from ``x (n_in, C_in)`` and ``g (n_out, C_out)``."""
        acc = accumulation_dtype(x.dtype)
        V = len(self.start) - 1
        with torch.autocast(x.device.type, enabled=False):
            out = x.new_zeros((V, x.shape[1], g.shape[1]), dtype=acc)
            for o in range(V):
                if o == self.identity:
                    out[o] += (x.t() @ g).to(acc)
                    continue
                for rows_in, rows_out in self._chunks(o, max(x.shape[1], g.shape[1])):
                    out[o] += (x.index_select(0, rows_in).t() @ g.index_select(0, rows_out)).to(acc)
        return out.to(x.dtype)
