"""The grid search of Pointwise-convolution pairs against the dense integer rule, and the rule
against the literal float semantics."""
import pytest
import torch

import pointconv.conv._pointwise_pairs as pairs
import pointconv.sparse.kernel_map as kernel_map
from pointconv.conv._pointwise_pairs import cell_of, neighbor_entries, neighbor_pairs, quantize


def dense_pairs(U, batch, s):
    cell = cell_of(U[:, None], U[None], s)
    cell = torch.where(batch[:, None] == batch[None], cell, -1)
    i, j = torch.nonzero(cell >= 0, as_tuple=True)
    return sorted(zip(i.tolist(), j.tolist(), cell[i, j].tolist()))


def clouds(seed):
    """Uniform, a lattice whose points sit exactly on cell borders and cube faces, near-duplicates
    in clusters, negative and far-away coordinates, several clouds with one-point ones."""
    g = torch.Generator().manual_seed(seed)
    n = 150
    kinds = [
        (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1, 0.1),
        (torch.randint(-6, 7, (n, 3), generator=g).double() * 0.125, 0.25),
        ((torch.rand(n, 3, generator=g) * 4).round().double() * 0.05 + torch.randn(n, 3, generator=g).double() * 1e-9, 0.05),
        (torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.3 - 1e4, 0.07),
    ]
    batch = torch.sort(torch.randint(0, 4, (n,), generator=g)).values
    batch[-1] = 5  # a cloud of one point, and empty clouds 4
    return kinds, batch


@pytest.mark.parametrize("dense_table", [True, False])
@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_grid_search_finds_exactly_the_dense_pairs(s, dense_table, monkeypatch):
    if not dense_table:
        monkeypatch.setattr(kernel_map, "_DENSE_TABLE_MAX_CELLS", 0)  # the sorted-key search
    monkeypatch.setattr(pairs, "_CHUNK", 97)  # many chunks of candidates
    monkeypatch.setattr(pairs, "_CENTERS", 13)  # and of centers
    for seed in range(3):
        kinds, batch = clouds(seed)
        for x, vs in kinds:
            U = quantize(x, vs)
            ci, cj, cc = neighbor_pairs(U, batch, s)
            got = list(zip(ci.tolist(), cj.tolist(), cc.tolist()))
            assert sorted(got) == dense_pairs(U, batch, s)
            # windows built for a larger dilation serve this one alike
            shared = neighbor_pairs(U, batch, s, pairs.Windows(U, batch, 5))
            assert list(zip(*(t.tolist() for t in shared))) == got
            # the order the sparse matrices are built in: by center, then cell
            assert got == sorted(got, key=lambda t: (t[0], t[2]))
            # the matrix entries: rows center * 27 + cell
            rows, neighbor = neighbor_entries(U, batch, s)
            assert torch.equal(rows, ci * 27 + cc) and torch.equal(neighbor, cj)


def test_the_integer_rule_is_the_literal_rule():
    """Away from borders the snapped rule is the float rule of DESIGN.md 5.2; on exact borders too."""
    g = torch.Generator().manual_seed(3)
    for x, vs in [(torch.rand(300, 3, generator=g, dtype=torch.float64), 0.13),
                  (torch.randint(0, 9, (300, 3), generator=g).double() * 0.125, 0.25)]:
        for s in (1, 2, 3):
            F = 2 * s + 1
            lo = x[:, None] - F * vs / 2
            inside = ((lo <= x[None]) & (x[None] <= x[:, None] + F * vs / 2)).all(-1)
            c = torch.clamp(torch.floor((x[None] - lo) / vs), max=F - 1).long()
            ok = inside & (c % s == 0).all(-1)
            c = c // s
            literal = torch.where(ok, (c[..., 0] * 3 + c[..., 1]) * 3 + c[..., 2], -1)
            U = quantize(x, vs)
            assert torch.equal(cell_of(U[:, None], U[None], s), literal)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_snapping_gives_exact_arithmetic_on_decimal_inputs(s):
    """float32 points on a 0.05 lattice, cell 0.1: the snapped rule equals exact rational arithmetic
    (done here in integer lattice units), where the literal float32 rule misplaces border points."""
    g = torch.Generator().manual_seed(s)
    k = torch.randint(-20, 20, (300, 3), generator=g)
    x = k.float() * 0.05
    F = 2 * s + 1
    d = k[None] - k[:, None] + F  # x_j - lo_i in lattice units (the cell is 2 units)
    c = torch.clamp(d // 2, max=F - 1)
    ok = ((d >= 0) & (d <= 2 * F)).all(-1) & (c % s == 0).all(-1)
    c = c // s
    exact = torch.where(ok, (c[..., 0] * 3 + c[..., 1]) * 3 + c[..., 2], -1)
    U = quantize(x, 0.1)
    assert torch.equal(cell_of(U[:, None], U[None], s), exact)
    ci, cj, cc = neighbor_pairs(U, torch.zeros(300, dtype=torch.int64), s)
    assert torch.equal(exact[ci, cj], cc) and ci.numel() == int((exact >= 0).sum())


def test_windows_must_reach_the_dilation():
    U = quantize(torch.rand(20, 3, dtype=torch.float64), 0.1)
    batch = torch.zeros(20, dtype=torch.int64)
    with pytest.raises(ValueError, match="windows reach dilation 2, not 3"):
        neighbor_pairs(U, batch, 3, pairs.Windows(U, batch, 2))


def test_empty_and_out_of_range():
    ci, cj, cc = neighbor_pairs(torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 2)
    assert ci.numel() == cj.numel() == cc.numel() == 0
    with pytest.raises(ValueError, match="cell_size must stay below 2"):
        quantize(torch.tensor([[1e12, 0.0, 0.0]]), 1e-3)
    # 2^60 cells: the keys of (window, x bin), 16 per window, would not fit in int64
    far = quantize(torch.tensor([[0.0, 0.0, 0.0], [2.0 ** 20, 2.0 ** 20, 2.0 ** 20]], dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="too many cells"):
        pairs.Windows(far, torch.zeros(2, dtype=torch.int64), 1)


def test_one_subtraction_tests_every_axis_flag_against_its_corner():
    """The s >= 2 candidate test ``(V - e) & guards == 0`` (borrows between the packed fields
    included) against the three per-axis comparisons, on extreme and random offsets."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    edge = torch.tensor([0, 1, 2, pairs.ONE // 2, pairs.ONE - 2, pairs.ONE - 1])

    def offsets():
        pick = torch.randint(0, 2, (n, 3), generator=g).bool()
        return torch.where(pick, edge[torch.randint(0, len(edge), (n, 3), generator=g)],
                           torch.randint(0, pairs.ONE, (n, 3), generator=g))

    phi, f = offsets(), offsets()
    t, b = torch.randint(0, 2, (n, 3), generator=g), torch.randint(0, 2, (n, 3), generator=g)
    flag = (2 * f + 1 - b) <= (2 * phi - 1 + t)
    expected = (flag == b.bool()).all(1)
    V = pairs._pack(2 * phi + (2 * pairs.ONE - 1) + t)
    e = pairs._pack(2 * f + 1 - b + (b << (pairs.FRAC_BITS + 1)))
    got = ((V - e) & pairs._GUARDS) == 0
    assert torch.equal(got, expected)
    assert 0.05 < expected.float().mean() < 0.5  # both outcomes well represented
