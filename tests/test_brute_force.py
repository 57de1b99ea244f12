"""The GEMM-ranked brute force (any D; CPU above 8 dimensions, CUDA float64) against the literal method."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pointconv
from pointconv._matmul_precision import ieee_float32_matmul
from pointconv.neighbors import ball_query_reference, knn_reference
from pointconv.neighbors import _brute_force
from pointconv.neighbors._brute_force import brute_force_search, exact_rows_search
from pointconv.neighbors._point_groups import PointGroups
from clouds import KINDS, make_cloud


def _same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(max_examples=80, deadline=None)
@given(
    Q=st.integers(0, 60), P=st.integers(0, 60), D=st.integers(1, 20), k=st.integers(1, 70),
    kind=st.sampled_from(["uniform", "lattice", "shifted", "spread", "tiny"]), dtype=st.sampled_from(["float32", "float64"]),
    radius=st.sampled_from([None, 0.5, 2.0]), exclude_self=st.booleans(), seed=st.integers(0, 2**16),
)
def test_matches_the_literal_method(Q, P, D, k, kind, dtype, radius, exclude_self, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)
    if kind == "lattice":  # exact ties and repeated points: rows need more candidates
        q, p = (torch.randint(0, 3, (n, D), generator=g).to(dtype) for n in (Q, P))
    else:
        q, p = (torch.rand(n, D, generator=g, dtype=torch.float64) for n in (Q, P))
        if kind == "shifted":  # far from the origin: the GEMM cancels, its bound must hold
            q, p = q + 1e4, p + 1e4
        if kind == "spread" and P:  # neighbors 1e-3 apart in a cloud 1e4 wide: the GEMM's rounding
            p = p * 1e4              # exceeds their distances, only the margin keeps them
            q = p[torch.randint(0, P, (Q,), generator=g)] + 1e-3 * q
        if kind == "tiny":  # squared distances near float32's subnormal range
            q, p = q * 1e-20, p * 1e-20
        q, p = q.to(dtype), p.to(dtype)
    r2 = None if radius is None else torch.tensor(radius * radius, dtype=dtype).item()
    if kind == "tiny" and r2 is not None:
        r2 *= 1e-40
    row_ids = torch.randint(0, max(P, 1), (Q,), generator=g) if exclude_self else None
    _same(brute_force_search(q, p, k, r2, exclude_self, row_ids), exact_rows_search(q, p, k, r2, exclude_self, row_ids))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D", [9, 16])
def test_public_search_above_the_tree_dimensions(kind, D):
    p = make_cloud(kind, 2, 700, D, seed=5)
    q = make_cloud(kind, 2, 300, D, seed=6)
    lengths = torch.tensor([700, 420])
    assert_res = pointconv.knn(p, p, 12, query_lengths=lengths, points_lengths=lengths, exclude_self=True)
    _same(assert_res, knn_reference(p, p, 12, query_lengths=lengths, points_lengths=lengths, exclude_self=True))
    res = pointconv.ball_query(q, p, 0.9, 10, points_lengths=lengths)
    _same(res, ball_query_reference(q, p, 0.9, 10, points_lengths=lengths))


def test_ties_escalate_to_the_whole_cloud(monkeypatch):
    # the escalation itself, on a cloud the grouped search would otherwise take
    monkeypatch.setattr(_brute_force, "repeats_are_costly", lambda *a: False)
    rounds, decided = [], []
    topk, gathered = torch.topk, _brute_force.sq_dist_gathered
    monkeypatch.setattr(_brute_force.torch, "topk", lambda x, m, **kw: rounds.append(m) or topk(x, m, **kw))
    monkeypatch.setattr(_brute_force, "sq_dist_gathered", lambda q, pc, c: decided.append(c.numel()) or gathered(q, pc, c))
    monkeypatch.setattr(_brute_force, "_APPROX_BYTES", 4 * 500 * 16)  # 16 queries per GEMM
    monkeypatch.setattr(_brute_force, "_DECIDE_ENTRIES", 20_000)
    p = torch.ones(500, 10)
    d, i = brute_force_search(p, p, 4, None, True)
    assert rounds[0] < 500 and rounds[-1] == 500  # 2k + 8 candidates, 4x per round, then all
    # 500 x 500 candidates in the last round, decided in batches of at most the cap plus a chunk
    assert sum(decided) == 500 * 500 and max(decided) <= 20_000 + 16 * 500
    assert torch.equal(i, torch.tensor([[j for j in range(5) if j != r][:4] for r in range(500)]))
    assert bool((d == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radius2, exclude_self", [(None, True), (None, False), (30.0, True)])
def test_repeated_points_are_searched_once_per_group(monkeypatch, dtype, radius2, exclude_self):
    # 3000 copies of the zero vector (features a ReLU zeroed) and two points copied 40 times among
    # 200 others: each run would widen its rows' candidates to every copy (20K identical points in
    # 16-D took 41 s that way); one point per group, each expanded to its lowest indices, is exact
    g = torch.Generator().manual_seed(3)
    p = torch.cat([torch.zeros(3000, 16), torch.randn(200, 16, generator=g)]).to(dtype)
    p[torch.randperm(3200, generator=g)[:80]] = p[3000:3002].repeat(40, 1)
    p = p[torch.randperm(3200, generator=g)]
    q = torch.cat([p[::7], torch.randn(30, 16, generator=g, dtype=dtype)])
    row_ids = torch.cat([torch.arange(0, 3200, 7), torch.full((30,), -1)])
    rounds = []
    topk = torch.topk
    monkeypatch.setattr(_brute_force.torch, "topk", lambda x, m, **kw: rounds.append(m) or topk(x, m, **kw))
    got = brute_force_search(q, p, 10, radius2, exclude_self, row_ids)
    _same(got, exact_rows_search(q, p, 10, radius2, exclude_self, row_ids))
    assert max(rounds) < 200  # never the whole cloud (nor its 200-odd groups)


def test_chunks_write_their_top_k_into_the_batch_buffers(monkeypatch):
    # each chunk's top-k as new small tensors, kept until its batch was decided, pinned the freed
    # approx matrices in glibc's heap: a 50K-point self-kNN in 64-D grew to 4.3 GB resident
    calls = []
    topk = torch.topk
    monkeypatch.setattr(_brute_force.torch, "topk", lambda x, m, **kw: calls.append("out" in kw) or topk(x, m, **kw))
    monkeypatch.setattr(_brute_force, "_APPROX_BYTES", 4 * 300 * 8)  # 8 queries per GEMM
    x = torch.randn(300, 12)
    _same(brute_force_search(x, x, 6, None, True), exact_rows_search(x, x, 6, None, True))
    assert len(calls) >= 300 // 8 and all(calls)


def test_point_groups_are_numbered_by_lowest_index():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [5.0, 5.0], [0.0, 0.0], [1.0, 2.0]])
    for hashes_order in [None, (torch.zeros(6, dtype=torch.int64), torch.arange(6))]:  # a collision on every row
        groups = PointGroups(x, *(hashes_order or ()))
        if hashes_order is None:
            assert groups.group.tolist() == [0, 1, 0, 2, 1, 0] and groups.members.tolist() == [0, 2, 5, 1, 4, 3]
            assert torch.equal(groups.representatives, x[[0, 1, 3]]) and groups.count.tolist() == [3, 2, 1]
        # any partition into equal points: each group's points equal, the groups by lowest index
        assert torch.equal(groups.representatives[groups.group], x)
        lowest = [int(groups.members[f]) for f in groups.first]
        assert lowest == sorted(lowest) and lowest[0] == 0
    # groups 2 and 0, their two lowest points each, then padding (group 3 and point 6: the counts)
    groups = PointGroups(x)
    column, point = groups.expand_rows(torch.tensor([[2, 0, 3]]), 2)
    assert point.tolist() == [[3, 0, 2]] and column.tolist() == [[0, 1, 1]]
    column, point = groups.expand_rows(torch.tensor([[2, 0, 3]]), 2, width=5)
    assert point.tolist() == [[3, 0, 2, 6, 6]]


def test_reduced_precision_matmul_ranks_in_float64(monkeypatch):
    q, p = torch.rand(50, 12), torch.rand(80, 12)
    dtypes = []
    original = _brute_force._gemm_dtype
    monkeypatch.setattr(_brute_force, "_gemm_dtype", lambda *a: dtypes.append(original(*a)) or dtypes[-1])
    expect = exact_rows_search(q, p, 5, None, False)
    _same(brute_force_search(q, p, 5, None, False), expect)
    torch.set_float32_matmul_precision("high")  # TF32 on CUDA, TF32 / bf16 through oneDNN on CPU
    try:
        assert not ieee_float32_matmul(torch.device("cpu")) and not ieee_float32_matmul(torch.device("cuda"))
        _same(brute_force_search(q, p, 5, None, False), expect)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert ieee_float32_matmul(torch.device("cpu"))
    assert dtypes == [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_region_changes_nothing(dtype):
    # autocast would run the ranking GEMM in fp16 / bf16, outside its error bound: every one of
    # these clustered clouds got wrong neighbors under bf16 (and EdgeConv under autocast with them)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(20, 16, generator=g) * 10
    x = centers[torch.randint(0, 20, (1500,), generator=g)] + torch.randn(1500, 16, generator=g) * 0.05
    expect = exact_rows_search(x, x, 8, None, True)
    with torch.autocast("cpu", dtype=dtype):
        _same(brute_force_search(x, x, 8, None, True), expect)
        got = pointconv.knn(x[None], x[None], 8, exclude_self=True)
    assert torch.equal(got.idx[0], expect[1]) and torch.equal(got.dists[0], expect[0])


def test_squares_beyond_float64_take_the_literal_method():
    q = torch.tensor([[1e160, 0.0], [0.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1e160, 0.0]], dtype=torch.float64)
    _same(brute_force_search(q, p, 3, None, False), exact_rows_search(q, p, 3, None, False))


def test_k_zero_on_the_grouped_path():
    # the grouped search's batch size divided by k * k (k = 0: ZeroDivisionError)
    p = torch.zeros(100, 12)
    d, i = brute_force_search(p, p, 0, None, False)
    assert d.shape == (100, 0) and i.shape == (100, 0)
