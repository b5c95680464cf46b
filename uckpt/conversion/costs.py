"""What a plan costs each rank, computed from the plan alone: the bytes it reads, sends, receives
and writes, the collectives it joins and the wave memory it holds, and a time under given
bandwidths. ``uckpt plan --simulate`` prints these for layouts no disk here could hold; the
integration tests check them against what real conversions count in ``uckpt_report.json``.

Counted as the run counts them (:mod:`uckpt.conversion.run`, ``ranks[]`` of the report):

* read: the fragments a rank packs (every tensor state), the model files it copies, the module
  tensors of the fp32-only folders it writes, and ``zero/optimizer_state.pt``'s tensors. Not
  counted: each shard's pickle (a few KB).
* crc: the CRC pass (``verify_crc``), which reads the files a rank opened again and its share of the
  files no rank reads otherwise (per-expert and pipeline layer files), counted as file sizes (the
  report's ``crc_checked_bytes`` counts the records, which leave out each file's zip container and
  pickle: nearly all of a tiny file, a negligible part of a large one).
* sent / received: fragment bytes that cross to another rank in the waves' ``all_to_all``.
* written: tensor bytes of the files it writes, plus the model files it copies (the tensors of
  those it rewrites: AutoEP); each file's container (zip records, pickle: about 1 KB) is not counted.
* collective calls: each phase's agreement, the metadata gathers and one ``all_to_all`` per wave.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from ..dsformat.constants import FP32_WEIGHT_KEY as FP32
from ..dsformat.index import CheckpointIndex
from ..dsformat.tp_rules import MergeKind
from ..regions import ParamSpec
from ..torchsave.format import TensorData, shape_numel
from .plan import BYTES_PER_ELEMENT, ConvertPlan, param_need

# Collectives a run joins before its report is gathered, besides the waves (rank > 1): the CUDA
# agreement of backend "auto" when uckpt starts the process group (comm.setup), the agreements of
# phases discover, read_metadata, verify_crc, plan, prepare_output, model_files, other_files and
# fsync (one all_gather each), and the metadata, run id and resume-decision gathers. Each wave adds
# its pack and merge_write agreements and its all_to_all. (The report gather and the publish
# agreement follow.)
FIXED_COLLECTIVES = 12
PER_WAVE_COLLECTIVES = 3


@dataclass
class RankCost:
    rank: int
    files_read: int = 0
    read_bytes: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    written_bytes: int = 0
    params_owned: int = 0
    peak_buffer_bytes: int = 0  # the largest wave's fragments and assembled tensors (the plan's bound)
    collective_calls: int = 0
    crc_bytes: int = 0  # file bytes its CRC pass reads


def written_numel(spec: ParamSpec) -> int:
    """Elements of one state file of ``spec``: the merged tensor (one slice of a replicated or averaged
    parameter, the kept rows after a vocabulary cut)."""
    rule = spec.rule
    if spec.flat_output or rule is None:
        return spec.numel
    if rule.kind in (MergeKind.REPLICATED, MergeKind.AVERAGE):
        return shape_numel(spec.tp_shapes[0])
    if rule.vocab_rows is not None:
        merged = list(spec.tp_shapes[0])
        merged[rule.cat_dim] = sum(s[rule.cat_dim] for s in spec.tp_shapes)
        return min(rule.vocab_rows, merged[0]) * shape_numel(merged[1:])
    return spec.numel


def _model_file_written(index: CheckpointIndex, s: int) -> int:
    """Bytes counted for the output's copy of model file ``s``: the file, or its tensors where the
    writer rewrites it (AutoEP's expert metadata added)."""
    return index.files.sources[s].nbytes if index.autoep_uc is None else index.model_tensor_bytes[s]


def _value_bytes(value) -> int:
    return len(memoryview(value.data).cast("B")) if isinstance(value, TensorData) else 0


def _wave_flows(index: CheckpointIndex, plan: ConvertPlan, wave, aliases: Dict[str, int]):
    """Bytes each rank reads, sends, receives and writes in ``wave``: (read, sent, received, written)."""
    world = plan.world_size
    read, sent, received, written = [0] * world, [0] * world, [0] * world, [0] * world
    for src, dst in wave.sends:
        n = BYTES_PER_ELEMENT * wave.count(index, src, dst)
        read[src] += n
        if src != dst:
            sent[src] += n
            received[dst] += n
    moved = plan.moved(wave)
    for p in wave.params:
        spec, owner = index.params[p], plan.owners[p]
        kept = [st for st in moved if st not in spec.skip_states]
        written[owner] += len(kept) * BYTES_PER_ELEMENT * written_numel(spec)
        if FP32 in moved:
            written[owner] += aliases.get(spec.name, 0) * BYTES_PER_ELEMENT * spec.numel
            if spec.has_step:
                written[owner] += _value_bytes(spec.step)
    return read, sent, received, written


def _alias_counts(index: CheckpointIndex) -> Dict[str, int]:
    """Tied aliases of each canonical parameter (its owner writes their fp32.pt too)."""
    aliases: Dict[str, int] = {}
    for canonical in index.aliases.values():
        aliases[canonical] = aliases.get(canonical, 0) + 1
    return aliases


def rank_costs(index: CheckpointIndex, plan: ConvertPlan, verify_crc: bool = True) -> List[RankCost]:
    world = plan.world_size
    rows = [RankCost(r) for r in range(world)]
    sources = index.files.sources
    for s in sources:
        rows[plan.readers[s.index]].files_read += 1
        if verify_crc:
            rows[plan.readers[s.index]].crc_bytes += s.nbytes
    if verify_crc:
        for row in rows:
            row.crc_bytes += sum(index.files.unread_nbytes(path) for path in index.files.unread_share(row.rank, world))
    for s, writer in plan.copy_writers.items():
        rows[writer].read_bytes += sources[s].nbytes
        rows[writer].written_bytes += _model_file_written(index, s)
    aliases = _alias_counts(index)
    for wave in plan.waves:
        read, sent, received, written = _wave_flows(index, plan, wave, aliases)
        use = [0] * world
        for p in wave.params:
            rows[plan.owners[p]].params_owned += plan.completes(wave)
            for r, n in param_need(index, p, plan.readers, plan.owners[p], wave.states).items():
                use[r] += n
        for r, row in enumerate(rows):
            row.read_bytes += read[r]
            row.sent_bytes += sent[r]
            row.received_bytes += received[r]
            row.written_bytes += written[r]
            row.peak_buffer_bytes = max(row.peak_buffer_bytes, use[r])
    for i, fb in enumerate(index.fallbacks):
        row = rows[plan.fallback_writers[i]]
        row.read_bytes += fb.nbytes
        row.written_bytes += BYTES_PER_ELEMENT * fb.numel
    rows[plan.optimizer_state_writer].read_bytes += index.optimizer_state_bytes
    rows[plan.optimizer_state_writer].written_bytes += index.optimizer_state_bytes
    if world > 1:
        calls = FIXED_COLLECTIVES - (0 if verify_crc else 1) + PER_WAVE_COLLECTIVES * len(plan.waves)
        for row in rows:
            row.collective_calls = calls
    return rows


@dataclass
class Bandwidth:
    """Per-rank bandwidths in bytes per second, and the latency of one collective call in seconds."""

    read: float
    write: float
    network: float
    latency: float = 1e-3


def predicted_seconds(index: CheckpointIndex, plan: ConvertPlan, bw: Bandwidth,
                      rows: Optional[List[RankCost]] = None) -> float:
    """Time of the plan when every rank moves bytes at ``bw``: the CRC pass, the model-file copies (on writer
    threads, so overlapping the first wave, counted here as if they did not), then each wave as long
    as its slowest rank (read, exchange and write in turn: the waves are separated by collectives),
    then the fp32-only folders and ``optimizer_state.pt``, plus each collective's latency."""
    rows = rows if rows is not None else rank_costs(index, plan)
    world = plan.world_size
    sources = index.files.sources
    copies = [0.0] * world
    for s, writer in plan.copy_writers.items():
        copies[writer] += sources[s].nbytes / bw.read + _model_file_written(index, s) / bw.write
    total = max(row.crc_bytes for row in rows) / bw.read + max(copies)
    aliases = _alias_counts(index)
    for wave in plan.waves:
        read, sent, received, written = _wave_flows(index, plan, wave, aliases)
        total += max(read[r] / bw.read + max(sent[r], received[r]) / bw.network + written[r] / bw.write
                     for r in range(world))
    tail = [0] * world
    for i, fb in enumerate(index.fallbacks):
        tail[plan.fallback_writers[i]] += fb.nbytes / bw.read + BYTES_PER_ELEMENT * fb.numel / bw.write
    tail[plan.optimizer_state_writer] += index.optimizer_state_bytes * (1 / bw.read + 1 / bw.write)
    return total + max(tail) + rows[0].collective_calls * bw.latency


def as_dicts(rows: List[RankCost]) -> List[Dict[str, int]]:
    return [asdict(r) for r in rows]
