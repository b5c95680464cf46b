"""Plan arithmetic as pure functions: no processes, no files."""
import pytest

from uckpt.dsformat.index import CheckpointIndex
from uckpt.dsformat.files import CheckpointFiles, Family
from uckpt.conversion.plan import STATE_COUNT, assign_owners, assign_readers, make_plan, param_bytes
from uckpt.regions import Fragment, ParamSpec, Source, SourceKind


def make_index(n_dp=4, params=((1000,), (30, 40), (7,), (5000,)), sizes=None):
    """A dense ZeRO-2 index: every parameter split evenly-ish over n_dp optimizer sources."""
    sources = [Source(0, "mp_rank_00_model_states.pt", SourceKind.MODEL, nbytes=10)]
    for d in range(n_dp):
        sources.append(Source(1 + d, f"zero_pp_rank_{d}_optim.pt", SourceKind.OPTIM, dp=d, nbytes=(sizes or [100] * n_dp)[d]))
    specs = []
    for i, shape in enumerate(params):
        numel = 1
        for s in shape:
            numel *= s
        frags, off = [], 0
        for d in range(n_dp):
            n = numel // n_dp + (1 if d < numel % n_dp else 0)
            if n:
                frags.append(Fragment(1 + d, 0, 0, n, 0, d, off))
                off += n
        specs.append(ParamSpec(f"p{i}", tuple(shape), [tuple(shape)], frags))
    files = CheckpointFiles("/ckpt", Family.ZERO12, sources, "")
    return CheckpointIndex(files=files, family=Family.ZERO12, zero_stage=2, tp_degree=1, pp_degree=1, dp_degree=n_dp,
                           params=specs, fallbacks=[], aliases={}, uc_info={}, injected_uc_info=False,
                           optimizer_state_source=1, copy_sources=[0])


def test_readers_balance_bytes():
    assert assign_readers([10, 9, 1, 1], 2) == [0, 1, 1, 0]
    assert assign_readers([5], 3) == [0]
    r = assign_readers([7, 7, 7, 7, 7, 7], 3)
    assert sorted(r.count(k) for k in range(3)) == [2, 2, 2]


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_every_fragment_moves_exactly_once(world):
    index = make_index()
    plan = make_plan(index, world, budget_bytes=1 << 30)
    moved = sorted((p, j) for w in plan.waves for pairs in w.sends.values() for p, j in pairs)
    expected = sorted((p, j) for p, spec in enumerate(index.params) for j in range(len(spec.fragments)))
    assert moved == expected
    for w in plan.waves:
        for (src, dst), pairs in w.sends.items():
            for p, j in pairs:
                assert plan.owners[p] == dst
                assert plan.readers[index.params[p].fragments[j].source] == src
    assert set(plan.readers) <= set(range(world))


def test_owners_balanced_by_bytes():
    index = make_index(params=[(100,)] * 8)
    owners = assign_owners(index, assign_readers([s.nbytes for s in index.files.sources], 4), 4)
    assert sorted(owners.count(r) for r in range(4)) == [2, 2, 2, 2]


def test_owner_prefers_the_rank_that_reads_the_fragments():
    # one source holds the whole parameter: its reader should own it when loads allow
    index = make_index(n_dp=1, params=[(64,)])
    readers = [1, 1]  # the model file and the only optimizer file are read by rank 1
    assert assign_owners(index, readers, 2) == [1]


def _zero2_index(n_dp, sizes):
    """A real ZeRO-2 layout: the parameters laid end to end in one flat buffer cut into n_dp equal
    partitions, so most parameters lie inside one optimizer file."""
    total = sum(sizes)
    part = -(-total // n_dp)
    sources = [Source(0, "mp_rank_00_model_states.pt", SourceKind.MODEL, nbytes=10)]
    sources += [Source(1 + d, f"zero_pp_rank_{d}_optim.pt", SourceKind.OPTIM, dp=d, nbytes=12 * part) for d in range(n_dp)]
    specs, start = [], 0
    for i, numel in enumerate(sizes):
        frags, off = [], 0
        while off < numel:
            d = (start + off) // part
            n = min(numel - off, (d + 1) * part - (start + off))
            frags.append(Fragment(1 + d, 0, (start + off) - d * part, n, 0, d, off))
            off += n
        specs.append(ParamSpec(f"p{i}", (numel,), [(numel,)], frags))
        start += numel
    files = CheckpointFiles("/ckpt", Family.ZERO12, sources, "")
    return CheckpointIndex(files=files, family=Family.ZERO12, zero_stage=2, tp_degree=1, pp_degree=1, dp_degree=n_dp,
                           params=specs, fallbacks=[], aliases={}, uc_info={}, injected_uc_info=False,
                           optimizer_state_source=1, copy_sources=[0])


@pytest.mark.parametrize("world", [2, 4])
def test_owners_keep_parameters_where_they_are_read(world):
    # 4 optimizer files over 2 or 4 ranks: each parameter goes to the rank reading (most of) it, and
    # the loads stay balanced; before, ownership by load alone sent about half the bytes across
    sizes = [4096] * 12 + [1000, 3000, 700, 5000, 2300]
    index = _zero2_index(4, sizes)
    plan = make_plan(index, world, budget_bytes=1 << 40)
    moved = sum(w.count(index, s, d) for w in plan.waves for s in range(world) for d in range(world) if s != d)
    split = sum(f.numel for p in index.params if len(p.fragments) > 1 for f in p.fragments)
    assert moved <= STATE_COUNT * split  # only parameters that straddle two files move, at most
    load = [0] * world
    for i, r in enumerate(plan.owners):
        load[r] += param_bytes(index.params[i].numel)
    assert max(load) <= sum(load) / world + max(param_bytes(n) for n in sizes)  # as LPT: one parameter over


def test_waves_respect_the_budget():
    index = make_index(params=[(100,)] * 10)
    budget = 3 * param_bytes(100)
    plan = make_plan(index, 2, budget)
    assert len(plan.waves) > 1
    for w in plan.waves:
        use = [0, 0]
        for p in w.params:
            owner = plan.owners[p]
            use[owner] += param_bytes(index.params[p].numel)  # assembled in place
            for f in index.params[p].fragments:
                if plan.readers[f.source] != owner:  # staged: a send buffer and a receive buffer
                    use[plan.readers[f.source]] += param_bytes(f.numel)
                    use[owner] += param_bytes(f.numel)
        assert max(use) <= budget or len(w.params) == 1


def test_large_parameters_of_different_owners_share_their_state_waves():
    """Parameters over the budget move a state per wave, and share those waves where each rank's part
    of one state still fits: owners work side by side instead of one large parameter at a time."""
    from uckpt.conversion.plan import param_need

    index = make_index(params=[(100000,)] * 4)
    budget = 1_000_000  # one state of one parameter fits (600 KB on its owner), all three do not
    plan = make_plan(index, 2, budget_bytes=budget)
    assert all(w.only for w in plan.waves)
    assert any(len({plan.owners[p] for p in w.params}) == 2 for w in plan.waves)
    for w in plan.waves:
        use = [0, 0]
        for p in w.params:
            for r, n in param_need(index, p, plan.readers, plan.owners[p], 1).items():
                use[r] += n
        assert max(use) <= budget
    assert len(plan.waves) < 3 * 4
    assert sorted(p for w in plan.waves if w.only == plan.states[0] for p in w.params) == [0, 1, 2, 3]


def test_parameter_larger_than_budget_moves_one_state_per_wave():
    index = make_index(params=[(10,), (100000,), (10,)])
    plan = make_plan(index, 2, budget_bytes=param_bytes(1000))
    split = [w for w in plan.waves if w.params == [1]]
    assert [w.only for w in split] == list(plan.states) and all(w.states == 1 for w in split)
    assert [plan.completes(w) for w in split] == [False, False, True]
    assert all(w.only is None for w in plan.waves if w not in split)
    # every fragment of the split parameter still moves once per state
    moved = sum(w.count(index, s, d) for w in split for s in range(2) for d in range(2))
    assert moved == STATE_COUNT * index.params[1].numel


def test_counts_are_consistent_between_sender_and_receiver():
    index = make_index()
    plan = make_plan(index, 3, 1 << 30)
    for w in plan.waves:
        total_sent = sum(w.count(index, s, d) for s in range(3) for d in range(3))
        assert total_sent == STATE_COUNT * sum(index.params[p].numel for p in w.params)


def test_plan_is_deterministic():
    a, b = make_plan(make_index(), 3, 4096), make_plan(make_index(), 3, 4096)
    assert a == b
