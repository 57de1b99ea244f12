"""Sparse convolution on CPU: gather -> GEMM -> scatter per kernel offset, tile by tile of output rows.

``PairTables`` computes the two bilinear products of ``_bilinear`` from the pairs of a kernel map:

    conv(x, w)[out_rows[p]]  += x[in_rows[p]] @ w[o]          (every pair p of offset o)
    weight_grad(x, g)[o]      = sum_p x[in_rows[p]]^T g[out_rows[p]]

The output rows are cut into tiles of about 2 MiB, and every offset's pairs that write into a tile
are done before the next tile: the tile stays in cache while all the offsets add into it, and so do
the input rows it reads when the sites are ordered in space (whole offsets at a time stream the
output through memory once per offset: about 25% slower on the (a) benchmark). Within an offset
every output row has at most one pair, so a tile's pairs are ranges of the offset's pairs when they
are sorted by output row (the kernel maps build them so for sorted sites); an offset whose pairs
are not sorted is done after all the tiles, in pieces of a tile's size. A submanifold kernel's
center offset pairs every site with itself: one dense product per tile, written first, with no
gather or scatter.

Threads: the tiles write disjoint rows, so they run as independent items on ``_threads`` (one
torch thread each; the small GEMMs run at the core's peak on one thread, where two threads on one
GEMM reach about 80% of twice that); so do the weight gradient's terms of each tile. Every output
row receives its terms in a fixed order (the center, the sorted offsets in order, then the others)
and each offset's weight gradient sums its terms in the order of the tiles: the results are the
same for any number of threads, and deterministic. fp16 / bf16 products are summed in float32 and
rounded once.
"""
from __future__ import annotations

import torch

from .._dtypes import accumulation_dtype
from .._func_transforms import outside_func_transforms
from .._threads import map_ordered

_TILE_ELEMENTS = 1 << 19  # tile rows times the wider channel count: 2 MiB of float32
_THREADS_MIN_ELEMENTS = 1 << 20  # pairs times channels: below, the threads cost more than they save


class PairTables:
    """The pairs ``in_rows -> out_rows`` of a kernel map grouped by offset (``start``, as in
    ``KernelMap``; within an offset each output row at most once), onto ``n_out`` output rows;
    ``identity``: the offset whose pairs are (i, i) for every row, or None. ``transposed``: the
    same pairs read from the input side."""

    def __init__(self, in_rows, out_rows, start: list[int], n_in: int, n_out: int, identity=None, transposed=None):
        # int32 rows gather faster (index_select), int64 ones scatter faster (index_add_ takes a slow
        # path for int32: 3.7x slower on the (a) benchmark)
        self.in_rows = in_rows.to(torch.int32 if n_in < 1 << 31 else torch.int64)
        self.out_rows = out_rows.long()
        self.start, self.n_in, self.n_out, self.identity = start, n_in, n_out, identity
        self._pairs, self._transposed = (in_rows, out_rows), transposed
        self._sorted = self._offsets_sorted()
        self._tiles_cache = {}

    @property
    @outside_func_transforms
    def transposed(self) -> "PairTables":
        """Built on first use: a forward that needs no feature gradient never builds it."""
        if self._transposed is None:
            in_rows, out_rows = self._pairs
            self._transposed = PairTables(out_rows, in_rows, self.start, self.n_out, self.n_in, self.identity, self)
        return self._transposed

    def _offsets_sorted(self) -> list[bool]:
        """Per offset: are its pairs in ascending order of output row?"""
        V = len(self.start) - 1
        descents = torch.nonzero(self.out_rows[1:] < self.out_rows[:-1]).squeeze(1) + 1
        unsorted = [False] * V
        if descents.numel():
            bounds = torch.tensor(self.start, device=descents.device)
            # a descent at position p lies inside offset o when start[o] < p < start[o + 1]
            inside = torch.searchsorted(bounds, descents, right=True) - 1
            for o in torch.unique(inside[bounds.index_select(0, inside) != descents]).tolist():
                unsorted[o] = True
        return [not u for u in unsorted]

    def _map(self, fn, items, channels: int) -> list:
        """``[fn(item) for item in items]``, on the threads when the pairs are many enough."""
        if self.out_rows.numel() * channels < _THREADS_MIN_ELEMENTS:
            return [fn(item) for item in items]
        return map_ordered(fn, items, self.out_rows.device)

    @outside_func_transforms
    def _tiles(self, channels: int):
        """``(tiles, loose)``: per tile of output rows, ``(r0, r1, pieces)`` with the ranges
        ``(offset, begin, end)`` of the sorted offsets' pairs that write into rows ``r0 .. r1``;
        ``loose``: the other offsets' pairs in ranges of at most a tile's rows."""
        if channels not in self._tiles_cache:
            rows = max(1, _TILE_ELEMENTS // max(channels, 1))
            n_tiles = max(1, -(-self.n_out // rows))
            bounds = torch.arange(1, n_tiles, device=self.out_rows.device) * rows
            tiles = [(t * rows, min(self.n_out, (t + 1) * rows), []) for t in range(n_tiles)]
            loose = []
            for o in range(len(self.start) - 1):
                a, b = self.start[o], self.start[o + 1]
                if o == self.identity or a == b:
                    continue
                if self._sorted[o]:
                    cuts = (torch.searchsorted(self.out_rows[a:b], bounds) + a).tolist()
                    for tile, c, e in zip(tiles, [a] + cuts, cuts + [b]):
                        if e > c:
                            tile[2].append((o, c, e))
                else:
                    loose += [(o, c, min(b, c + rows)) for c in range(a, b, rows)]
            self._tiles_cache[channels] = tiles, loose
        return self._tiles_cache[channels]

    def conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``(n_out, C_out)`` from ``x (n_in, C_in)`` and ``w (V, C_in, C_out)``."""
        acc = accumulation_dtype(x.dtype)
        x, w = x.detach(), w.detach()  # values only: _bilinear differentiates
        out = x.new_empty((self.n_out, w.shape[2]), dtype=acc)
        tiles, loose = self._tiles(max(w.shape[1], w.shape[2]))

        def add_pairs(o, a, b):
            out.index_add_(0, self.out_rows[a:b], (x.index_select(0, self.in_rows[a:b]) @ w[o]).to(acc))

        def tile_products(tile):
            r0, r1, pieces = tile
            if self.identity is None:
                out[r0:r1].zero_()
            elif acc == x.dtype:  # the center's product is the first term of every row
                torch.mm(x[r0:r1], w[self.identity], out=out[r0:r1])
            else:
                out[r0:r1] = x[r0:r1] @ w[self.identity]
            for piece in pieces:
                add_pairs(*piece)

        with torch.autocast(x.device.type, enabled=False):
            self._map(tile_products, tiles, w.shape[1] + w.shape[2])
            for piece in loose:  # rows anywhere: after the tiles, on this thread
                add_pairs(*piece)
        return out.to(x.dtype)

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``(V, C_in, C_out)`` from ``x (n_in, C_in)`` and ``g (n_out, C_out)``."""
        acc = accumulation_dtype(x.dtype)
        x, g = x.detach(), g.detach()
        tiles, loose = self._tiles(max(x.shape[1], g.shape[1]))

        def pair_grads(pieces):  # (offset, its term) per piece
            return [(o, (x.index_select(0, self.in_rows[a:b]).t() @ g.index_select(0, self.out_rows[a:b])).to(acc))
                    for o, a, b in pieces]

        def tile_grads(pieces):  # None: the center's term, x^T g
            return [(self.identity, (x.t() @ g).to(acc))] if pieces is None else pair_grads(pieces)

        # the center first: the largest item, started early
        items = ([] if self.identity is None else [None]) + [pieces for _, _, pieces in tiles]
        out = x.new_zeros((len(self.start) - 1, x.shape[1], g.shape[1]), dtype=acc)
        with torch.autocast(x.device.type, enabled=False):
            terms = self._map(tile_grads, items, x.shape[1] + g.shape[1])
            # each offset's terms are summed in the order of its pieces (the tiles', then the loose)
            for o, term in [t for item in terms for t in item] + pair_grads(loose):
                out[o] += term
        return out.to(x.dtype)
