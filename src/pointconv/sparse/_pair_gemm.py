"""Sparse convolution on CPU: gather -> GEMM -> scatter per kernel offset, tile by tile of output rows.

``PairTables`` computes the two bilinear products of ``_bilinear`` from the pairs of a kernel map:

    conv(x, w)[out_rows[p]]  += x[in_rows[p]] @ w[o]          (every pair p of offset o)
    weight_grad(x, g)[o]      = sum_p x[in_rows[p]]^T g[out_rows[p]]

The output rows are cut into tiles of a few MiB, and every offset's pairs that write into a tile are
done before the next tile: the tile stays in cache while all the offsets add into it, and so do the
input rows it reads when the sites are ordered in space (whole offsets at a time stream the output
through memory once per offset: about 25% slower on the (a) benchmark; one chunk at a time of each
offset, about as slow). Within an offset every output row has at most one pair, so the tiles are
ranges of the offset's pairs when they are sorted by output row (the kernel maps build them so for
sorted sites); an offset whose pairs are not is cut into equal pieces instead (correct, less
cache-friendly). A submanifold kernel's center offset pairs every site with itself: one dense
product, written first, with no gather or scatter.

Every output row receives its terms in a fixed order (the center, then the offsets in order), and
each piece's weight-gradient term is added in a fixed order: deterministic. The scatter
(``index_add_``) is sequential on CPU. fp16 / bf16 products are summed in float32 and rounded once.
"""
from __future__ import annotations

import torch

_TILE_ELEMENTS = 1 << 19  # tile rows times the wider channel count: 2 MiB of float32


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where products of ``dtype`` are summed: float32 for fp16 / bf16, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
        self._pieces_cache = {}

    @property
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

    def _pieces(self, channels: int):
        """Per tile of output rows, ``(offset, begin, end)`` ranges of pairs: for a sorted offset its
        pairs writing into the tile, for another an equal share of its pairs (at most a tile)."""
        if channels not in self._pieces_cache:
            rows = max(1, _TILE_ELEMENTS // max(channels, 1))
            n_tiles = max(1, -(-self.n_out // rows))
            bounds = torch.arange(1, n_tiles, device=self.out_rows.device) * rows
            tiles = [[] for _ in range(n_tiles)]
            for o in range(len(self.start) - 1):
                a, b = self.start[o], self.start[o + 1]
                if o == self.identity or a == b:
                    continue
                if self._sorted[o]:
                    cuts = (torch.searchsorted(self.out_rows[a:b], bounds) + a).tolist()
                else:  # at most n_out pairs: n_tiles pieces of at most a tile's rows each
                    cuts = [a + (b - a) * t // n_tiles for t in range(1, n_tiles)]
                for t, (c, e) in enumerate(zip([a] + cuts, cuts + [b])):
                    if e > c:
                        tiles[t].append((o, c, e))
            self._pieces_cache[channels] = [p for tile in tiles for p in tile]
        return self._pieces_cache[channels]

    def conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``(n_out, C_out)`` from ``x (n_in, C_in)`` and ``w (V, C_in, C_out)``."""
        acc = accumulation_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if self.identity is None:
                out = x.new_zeros((self.n_out, w.shape[2]), dtype=acc)
            elif acc == x.dtype:  # the center's product is the first term of every row
                out = torch.mm(x, w[self.identity], out=x.new_empty((self.n_out, w.shape[2])))
            else:
                out = (x @ w[self.identity]).to(acc)
            for o, a, b in self._pieces(max(w.shape[1], w.shape[2])):
                out.index_add_(0, self.out_rows[a:b], (x.index_select(0, self.in_rows[a:b]) @ w[o]).to(acc))
        return out.to(x.dtype)

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``(V, C_in, C_out)`` from ``x (n_in, C_in)`` and ``g (n_out, C_out)``."""
        acc = accumulation_dtype(x.dtype)
        V = len(self.start) - 1
        with torch.autocast(x.device.type, enabled=False):
            out = x.new_zeros((V, x.shape[1], g.shape[1]), dtype=acc)
            if self.identity is not None:
                out[self.identity] = (x.t() @ g).to(acc)
            for o, a, b in self._pieces(max(x.shape[1], g.shape[1])):
                out[o] += (x.index_select(0, self.in_rows[a:b]).t() @ g.index_select(0, self.out_rows[a:b])).to(acc)
        return out.to(x.dtype)
