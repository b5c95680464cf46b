"""One wave of the conversion: each rank packs the fragments it read for other owners, one
``all_to_all`` moves them, and each owner assembles its parameters, reading its own fragments
straight into place. Parameters are yielded as soon as they are complete so their writes overlap
the next reads."""
from typing import Dict, Iterator, Tuple

from ..dsformat.index import CheckpointIndex
from ..torchsave import direct as directio
from .plan import ConvertPlan, Wave
from .source import FragmentSource

BYTES = 4  # fp32 elements


def send_count(wave: Wave, index: CheckpointIndex, src: int, dst: int) -> int:
    """fp32 elements ``src`` sends ``dst`` in ``wave``; a rank's own fragments skip the exchange."""
    return 0 if src == dst else wave.count(index, src, dst)


def pack(wave: Wave, index: CheckpointIndex, plan: ConvertPlan, source: FragmentSource, rank: int):
    """This rank's fragments for other owners, in plan order, as one flat fp32 buffer, and the counts."""
    counts = [send_count(wave, index, rank, d) for d in range(plan.world_size)]
    send = bytearray(BYTES * sum(counts))
    view = memoryview(send)
    pos = 0
    for d in range(plan.world_size):
        if d == rank:
            continue
        for p, j in wave.sends.get((rank, d), ()):
            spec = index.params[p]
            f = spec.fragments[j]
            for st in plan.moved(wave):
                if st not in spec.skip_states:  # else a zero placeholder: that state is not written
                    source.read_into(f, st, view[pos:pos + BYTES * f.numel])
                pos += BYTES * f.numel
    return send, counts


def assemble(wave: Wave, index: CheckpointIndex, plan: ConvertPlan, recv, source: FragmentSource,
             rank: int) -> Iterator[Tuple[int, Dict[str, bytearray]]]:
    """Owned parameters of the wave, each yielded as (param, {state: its flat fp32 bytes}) as soon as
    it is complete, so that its write (a writer thread's, for a large one) overlaps the reads of the
    next ones, and its buffers go once written.

    Fragments from other ranks come from ``recv`` (placed first: a copy in memory); this rank's own
    are read from the source straight into place (with one rank, nothing is ever staged in a send
    buffer)."""
    states = plan.moved(wave)
    out = {p: {st: directio.buffer(BYTES * index.params[p].numel) for st in states}
           for p in wave.params if plan.owners[p] == rank}
    incoming = memoryview(recv)
    pos = 0
    for s in range(plan.world_size):
        if s == rank:
            continue
        for p, j in wave.sends.get((s, rank), ()):
            spec = index.params[p]
            lo, n = BYTES * spec.flat_offset(spec.fragments[j]), BYTES * spec.fragments[j].numel
            for st in states:
                out[p][st][lo:lo + n] = incoming[pos:pos + n]
                pos += n
    mine = wave.sends.get((rank, rank), ())
    left = {p: 0 for p in out}
    for p, _ in mine:
        left[p] += 1
    for p in [p for p, k in left.items() if k == 0]:
        yield p, out.pop(p)
    for p, j in mine:
        spec = index.params[p]
        f = spec.fragments[j]
        lo, n = BYTES * spec.flat_offset(f), BYTES * f.numel
        for st in states:
            if st not in spec.skip_states:  # else a zero placeholder: that state is not written
                source.read_into(f, st, memoryview(out[p][st])[lo:lo + n])
        left[p] -= 1
        if not left[p]:
            yield p, out.pop(p)
