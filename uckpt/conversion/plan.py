"""The conversion plan: who reads which shard, who owns (merges and writes) which parameter,
and which fragments move from reader to owner in each memory-bounded wave.

Pure functions of plain data, in the spirit of ``torch.distributed.checkpoint`` planners: no
I/O, no collectives, deterministic, so every rank computes the same plan and the arithmetic is
unit-testable without processes.
"""
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..dsformat.constants import TENSOR_STATES
from ..dsformat.index import CheckpointIndex

BYTES_PER_ELEMENT = 4  # the Universal states are fp32 (master weights and Adam moments)
STATE_COUNT = len(TENSOR_STATES)


def assign_readers(sizes: Sequence[int], world: int) -> List[int]:
    """Rank that reads each file: largest files first onto the least-loaded rank (LPT), ties to the lower rank."""
    load = [0] * world
    readers = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        readers[i] = r
        load[r] += sizes[i]
    return readers


def param_bytes(numel: int) -> int:
    return numel * STATE_COUNT * BYTES_PER_ELEMENT


def assign_owners(index: CheckpointIndex, readers: Sequence[int], world: int) -> List[int]:
    """Owner of each parameter, balanced by bytes with as little as possible crossing the network.

    Each parameter first goes to the rank that reads most of its fragments. A rank left above its
    fair share (total / world, or the largest parameter) then gives away the parameters it holds
    least of (a parameter split across files first, then the smaller), each to the rank that reads
    most of it among those with room, else to the least-loaded rank; so no rank ends more than one
    parameter above the average. Deterministic: ties go to the lower rank.
    """
    sizes = [param_bytes(p.numel) for p in index.params]
    cap = max([sum(sizes) / world] + sizes) if sizes else 0
    local = []
    for p in index.params:
        here = [0] * world
        for f in p.fragments:
            here[readers[f.source]] += f.numel
        local.append(here)
    owners = [max(range(world), key=lambda r: (here[r], -r)) for here in local]
    load = [0] * world
    for i, r in enumerate(owners):
        load[r] += sizes[i]
    for r in range(world):
        if load[r] <= cap:
            continue
        mine = [i for i in range(len(owners)) if owners[i] == r]
        for i in sorted(mine, key=lambda i: (local[i][r] / max(index.params[i].numel, 1), sizes[i], i)):
            if load[r] <= cap:
                break
            room = [d for d in range(world) if d != r and load[d] + sizes[i] <= cap]
            if room:
                d = max(room, key=lambda d: (local[i][d], -load[d], -d))
            else:
                d = min(range(world), key=lambda d: (load[d], d))
                if load[d] + sizes[i] >= load[r]:
                    continue  # moving it would not even out anything
            owners[i] = d
            load[r] -= sizes[i]
            load[d] += sizes[i]
    return owners


@dataclass
class Wave:
    """Parameters converted together; ``sends[(src, dst)]`` lists (param, fragment) pairs in buffer order."""

    params: List[int]
    sends: Dict[Tuple[int, int], List[Tuple[int, int]]] = field(default_factory=dict)
    states: int = STATE_COUNT  # tensor states each fragment carries (1 for an fp32-only export)
    # the one state this wave moves, of parameters too large for the budget with all their states:
    # they move in one wave per state, each state's file written as its wave completes
    only: Optional[str] = None

    def count(self, index: CheckpointIndex, src: int, dst: int) -> int:
        """fp32 elements ``src`` sends to ``dst`` (all tensor states the plan moves)."""
        return self.states * sum(index.params[p].fragments[f].numel for p, f in self.sends.get((src, dst), ()))


@dataclass
class ConvertPlan:
    world_size: int
    readers: List[int]  # source index -> rank
    owners: List[int]  # param index -> rank
    fallback_writers: List[int]  # fallback index -> rank (the reader of its model file)
    optimizer_state_writer: int
    copy_writers: Dict[int, int]  # model source index -> rank that copies it
    waves: List[Wave]
    budget_bytes: int
    states: Tuple[str, ...] = TENSOR_STATES  # what the exchange moves: all three, or fp32 only (an export)

    def moved(self, wave: Wave) -> Tuple[str, ...]:
        """The tensor states ``wave`` moves (and its owners write)."""
        return (wave.only,) if wave.only else self.states

    def completes(self, wave: Wave) -> bool:
        """Whether ``wave`` writes the last files of its parameters (a wave of a split parameter's first
        states does not)."""
        return wave.only is None or wave.only == self.states[-1]

    def without(self, done: Set[int]) -> "ConvertPlan":
        """The plan less the parameters in ``done`` (written by an earlier run that died): their
        fragments are neither read, sent nor written again."""
        waves = []
        for w in self.waves:
            params = [p for p in w.params if p not in done]
            if params:
                sends = {k: [(p, f) for p, f in v if p not in done] for k, v in w.sends.items()}
                waves.append(replace(w, params=params, sends={k: v for k, v in sends.items() if v}))
        return replace(self, waves=waves)

    def rank_summary(self, index: CheckpointIndex) -> List[Dict[str, int]]:
        rows = []
        for r in range(self.world_size):
            srcs = [s for s in index.files.sources if self.readers[s.index] == r]
            own = [p for i, p in enumerate(index.params) if self.owners[i] == r]
            moved = sum(w.count(index, r, d) for w in self.waves for d in range(self.world_size) if d != r)
            rows.append({"rank": r, "files": len(srcs), "read_bytes": sum(s.nbytes for s in srcs),
                         "params": len(own), "param_bytes": sum(param_bytes(p.numel) for p in own),
                         "sent_bytes": moved * BYTES_PER_ELEMENT})
        return rows


def param_need(index: CheckpointIndex, i: int, readers: Sequence[int], owner: int,
               states: int = STATE_COUNT) -> Dict[int, int]:
    """Bytes parameter ``i`` holds on each rank during its wave: its owner's assembled states plus the
    receive buffer of the fragments other ranks read, and each other reader's send buffer. The
    owner's own fragments are read straight into place (no staging)."""
    p = index.params[i]
    per = states * BYTES_PER_ELEMENT
    need = {owner: per * p.numel}
    for f in p.fragments:
        r = readers[f.source]
        if r != owner:
            need[r] = need.get(r, 0) + per * f.numel  # its send buffer
            need[owner] += per * f.numel  # the owner's receive buffer
    return need


def make_waves(index: CheckpointIndex, readers: Sequence[int], owners: Sequence[int], world: int,
               budget_bytes: int, states: Sequence[str] = TENSOR_STATES) -> List[Wave]:
    """Group parameters (in checkpoint order) so each rank's wave memory (:func:`param_need`) stays
    within the budget. A parameter that exceeds it with all its states moves one state per wave
    (each state is a file of its own); such parameters share those waves where their ranks do, so
    large parameters of different owners still convert side by side. A rank takes one state that
    alone exceeds the budget only into a wave where it holds nothing else: a state cannot be split
    further without changing the Universal file format."""
    waves: List[Wave] = []
    cur, use = None, [0] * world  # the wave of whole parameters being filled
    split, split_use = [], [0] * world  # parameters moved a state per wave, being grouped

    def add_sends(sends: Dict[Tuple[int, int], List[Tuple[int, int]]], i: int):
        for j, f in enumerate(index.params[i].fragments):
            sends.setdefault((readers[f.source], owners[i]), []).append((i, j))

    def close_split():
        if split:
            sends: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
            for i in split:
                add_sends(sends, i)
            waves.extend(Wave(list(split), {k: list(v) for k, v in sends.items()}, 1, st) for st in states)

    for i in range(len(index.params)):
        need = param_need(index, i, readers, owners[i], len(states))
        if len(states) > 1 and max(need.values()) > budget_bytes:
            one = {r: n // len(states) for r, n in need.items()}  # one state of it
            if any(split_use[r] and split_use[r] + n > budget_bytes for r, n in one.items()):
                close_split()
                split, split_use = [], [0] * world
            split.append(i)
            for r, n in one.items():
                split_use[r] += n
            continue
        if cur is None or any(use[r] + n > budget_bytes for r, n in need.items()):
            cur, use = Wave([], states=len(states)), [0] * world
            waves.append(cur)
        cur.params.append(i)
        for r, n in need.items():
            use[r] += n
        add_sends(cur.sends, i)
    close_split()
    return waves


def make_plan(index: CheckpointIndex, world: int, budget_bytes: int,
              readers: Optional[Sequence[int]] = None, states: Sequence[str] = TENSOR_STATES,
              owner_groups: Sequence[Sequence[int]] = ()) -> ConvertPlan:
    """The plan for ``world`` ranks; ``readers`` (source index -> rank) where the input decides who holds
    each file (an in-job save: the rank that would write it), else spread by size. ``states``: what
    the exchange moves; ``owner_groups``: parameters that must have one owner (the parts of a tensor
    an export fuses)."""
    readers = list(readers) if readers is not None else assign_readers([s.nbytes for s in index.files.sources], world)
    owners = assign_owners(index, readers, world)
    for group in owner_groups:
        for i in group[1:]:
            owners[i] = owners[group[0]]
    return ConvertPlan(
        world_size=world,
        readers=readers,
        owners=owners,
        fallback_writers=[readers[fb.source] for fb in index.fallbacks],
        optimizer_state_writer=readers[index.optimizer_state_source],
        copy_writers={s: readers[s] for s in index.copy_sources},
        waves=make_waves(index, readers, owners, world, budget_bytes, tuple(states)),
        budget_bytes=budget_bytes,
        states=tuple(states),
    )


def describe(index: CheckpointIndex, plan: ConvertPlan) -> str:
    """Human-readable plan (``uckpt plan`` / ``--dry-run``)."""
    gib = 1 << 20
    lines = [
        f"checkpoint: {index.files.folder}",
        f"  ZeRO stage {index.zero_stage}, dp={index.dp_degree} tp={index.tp_degree} pp={index.pp_degree}, "
        f"{len(index.files.sources)} files ({index.files.total_bytes / gib:.1f} MiB), "
        f"{len(index.params)} parameters ({index.total_numel:,} elements), "
        f"{len(index.fallbacks)} fp32-only folders, {len(index.aliases)} tied aliases",
        f"plan: {plan.world_size} converter rank(s), {len(plan.waves)} wave(s), memory budget "
        f"{plan.budget_bytes / gib:.0f} MiB per rank",
        f"  {'rank':>4} {'files':>5} {'read MiB':>9} {'params':>6} {'owned MiB':>9} {'sent MiB':>8}",
    ]
    for row in plan.rank_summary(index):
        lines.append(f"  {row['rank']:>4} {row['files']:>5} {row['read_bytes'] / gib:>9.1f} {row['params']:>6} "
                     f"{row['param_bytes'] / gib:>9.1f} {row['sent_bytes'] / gib:>8.1f}")
    return "\n".join(lines)
