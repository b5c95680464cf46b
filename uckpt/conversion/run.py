"""Distributed conversion of a DeepSpeed ZeRO checkpoint into a Universal checkpoint.

Phases (each ends with an agreement, so all ranks fail together with the same cause):
  1. discover files by name; check the output location        (every rank, no tensor reads)
  2. open own shards memory-mapped; share their metadata      (all_gather_object)
  3. build the index and the plan                             (pure, identical on every rank)
  4. per wave: pack own fragments -> all_to_all -> owners assemble and write
  5. files with no fragments (fallbacks, optimizer_state.pt, model-file copies), report, publish
"""
import os
import resource
import sys
import time
from typing import Any, Dict, List

from .. import __version__
from ..dsformat import constants as C
from ..torchsave import direct as directio
from .comm import Comm
from ..dsformat.index import CheckpointIndex, build_index
from ..dsformat.files import Family, discover
from .payloads import alias_payload, fallback_payload, state_payload
from .plan import ConvertPlan, Wave, assign_readers, describe, make_plan, param_bytes
from .progress import Progress
from ..torchsave.reader import FileDescriptors
from ..dsformat.shards import load_shard, read_fragment, source_meta
from .output import OutputFolder, check_paths


class _Phase:
    """Run a block of local work and turn any exception into an agreement across ranks."""

    def __init__(self, comm: Comm, timings: Dict[str, float], name: str):
        self.comm, self.timings, self.name = comm, timings, name

    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt / SystemExit: do not swallow
        self.comm.agree(exc)
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.monotonic() - self.t0
        return False


def _send_counts(wave: Wave, index: CheckpointIndex, src: int, dst: int) -> int:
    return 0 if src == dst else wave.count(index, src, dst)  # a rank's own fragments skip the exchange


def _pack(wave: Wave, index: CheckpointIndex, plan: ConvertPlan, shards, rank: int, fds: FileDescriptors):
    """This rank's fragments for other owners, in plan order, as one flat fp32 buffer (bytes)."""
    world = plan.world_size
    counts = [_send_counts(wave, index, rank, d) for d in range(world)]
    send = bytearray(4 * sum(counts))
    view = memoryview(send)
    pos = 0
    for d in range(world):
        if d == rank:
            continue
        for p, j in wave.sends.get((rank, d), ()):
            f = index.params[p].fragments[j]
            for st in C.TENSOR_STATES:
                if st not in index.params[p].skip_states:  # else a zero placeholder: that state is not written
                    read_fragment(shards[f.source], index.family, f, st, view[pos:pos + 4 * f.numel], fds)
                pos += 4 * f.numel
    return send, counts


def _assemble(wave: Wave, index: CheckpointIndex, plan: ConvertPlan, recv: bytearray, shards, rank: int,
              fds: FileDescriptors):
    """Owned parameters of the wave, each yielded as (param, {state: its flat fp32 bytes}) as soon as
    it is complete, so that its write (a writer thread's, for a large one) overlaps the reads of the
    next ones, and its buffers go once written.

    Fragments from other ranks come from ``recv`` (placed first: a copy in memory); this rank's own
    are read from its shards straight into place (with one rank, nothing is ever staged in a send
    buffer)."""
    out = {p: {st: directio.buffer(4 * index.params[p].numel) for st in C.TENSOR_STATES}
           for p in wave.params if plan.owners[p] == rank}
    incoming = memoryview(recv)
    pos = 0
    for s in range(plan.world_size):
        if s == rank:
            continue
        for p, j in wave.sends.get((s, rank), ()):
            spec = index.params[p]
            lo, n = 4 * spec.flat_offset(spec.fragments[j]), 4 * spec.fragments[j].numel
            for st in C.TENSOR_STATES:
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
        lo, n = 4 * spec.flat_offset(f), 4 * f.numel
        for st in C.TENSOR_STATES:
            if st not in spec.skip_states:  # else a zero placeholder: that state is not written
                read_fragment(shards[f.source], index.family, f, st, memoryview(out[p][st])[lo:lo + n], fds)
        left[p] -= 1
        if not left[p]:
            yield p, out.pop(p)


def _write_param(out: OutputFolder, index: CheckpointIndex, p: int, flats: Dict[str, bytearray], aliases_of):
    spec = index.params[p]
    files = {C.STEP_KEY: spec.step} if spec.has_step else {}
    for st in C.TENSOR_STATES:
        if st not in spec.skip_states:
            files[st] = state_payload(spec, flats[st], st)
    out.save_param(spec.name, files)
    for alias in aliases_of.get(spec.name, ()):
        out.save_param(alias, {C.FP32_WEIGHT_KEY: alias_payload(spec, flats[C.FP32_WEIGHT_KEY])})


def _with_autoep_info(model_state, pattern, layers):
    """A model-state file as DeepSpeed's converter rewrites it for AutoEP: its UC info names the expert
    pattern and the AutoEP layers (spec 3.2 step 6; ZeRO-3: the file's own layers, 3.3); all else unchanged."""
    out = dict(model_state)
    info = dict(out.get(C.UNIVERSAL_CHECKPOINT_INFO) or {})
    info[C.EXPERT_PARAMETER_PATTERNS] = [pattern]
    info[C.AUTOEP_LAYERS_KEY] = layers if layers is not None else out.get(
        C.AUTOEP_LAYERS_KEY, out.get(C.AUTOEP_LAYERS_KEY_LEGACY))
    out[C.UNIVERSAL_CHECKPOINT_INFO] = info
    return out


def _optimizer_state(index: CheckpointIndex, sd: Dict[str, Any]) -> Dict[str, Any]:
    """zero/optimizer_state.pt exactly as DeepSpeed's ``_save_optimizer_state(_stage3)`` writes it."""
    osd = sd[C.OPTIMIZER_STATE_DICT]
    if index.family is Family.ZERO3:
        out = dict(osd)
        out[C.PARAM_GROUPS] = osd[C.OPTIMIZER_STATE_DICT][C.PARAM_GROUPS]
        return out
    sharded = (C.BASE_OPTIMIZER_STATE, C.PARAM_SLICE_MAPPINGS, C.SINGLE_PARTITION_OF_FP32_GROUPS)
    out = {k: v for k, v in osd.items() if k not in sharded}
    # DeepSpeed reads this shard through ZeROCheckpoint.get_state_for_rank, which zeroes the group
    # paddings (after stripping them) and sets partition_count to the checkpoint's DP degree.
    if out.get(C.GROUP_PADDINGS):
        out[C.GROUP_PADDINGS] = [0] * len(out[C.GROUP_PADDINGS])
    if out.get(C.PARTITION_COUNT):
        out[C.PARTITION_COUNT] = [index.dp_degree] * len(out[C.PARTITION_COUNT])
    out[C.PARAM_GROUPS] = osd[C.BASE_OPTIMIZER_STATE][C.PARAM_GROUPS]
    return out


def run(cfg, comm: Comm, stream=None) -> Dict[str, Any]:
    """Convert ``cfg.input_folder`` into ``cfg.output_folder`` on all ranks of ``comm``; returns the report."""
    fds = FileDescriptors()
    try:
        return _run(cfg, comm, fds, stream)
    finally:
        fds.close()


def _run(cfg, comm: Comm, fds: FileDescriptors, stream=None) -> Dict[str, Any]:
    stream = stream or sys.stderr
    rank, world = comm.rank, comm.world_size
    timings: Dict[str, float] = {}
    t_start = time.monotonic()
    progress = Progress(0, 0, enabled=(rank == 0 and not cfg.log.quiet), stream=stream)
    progress.log(f"uckpt {__version__}: converting {cfg.input_folder} -> {cfg.output_folder} "
                 f"on {world} rank(s) (backend {comm.backend})")

    with _Phase(comm, timings, "discover"):
        files = discover(cfg.input_folder)
        if not cfg.dry_run:
            check_paths(cfg.input_folder, cfg.output_folder, cfg.overwrite)

    readers = assign_readers([s.nbytes for s in files.sources], world)
    shards: Dict[int, Any] = {}
    metas: Dict[int, Any] = {}
    opened: List[str] = []
    with _Phase(comm, timings, "read_metadata"):
        for s in files.sources:
            if readers[s.index] == rank:
                shards[s.index] = load_shard(s.path)
                opened.append(s.path)
                metas[s.index] = source_meta(s, shards[s.index], files.family)
    for part in comm.all_gather_object(metas):
        metas.update(part)

    with _Phase(comm, timings, "plan"):
        index = build_index(files, metas, cfg.inject_missing_state, cfg.strict)
        plan = make_plan(index, world, int(cfg.memory.budget_mb) << 20)
    for note in index.notes:
        progress.log(note)
    total_bytes = sum(param_bytes(p.numel) for p in index.params)
    progress.total_params, progress.total_bytes = len(index.params), total_bytes
    report: Dict[str, Any] = {
        "uckpt_version": __version__,
        "input_folder": os.path.abspath(cfg.input_folder),
        "output_folder": os.path.abspath(cfg.output_folder),
        "checkpoint": {"family": index.family, "zero_stage": index.zero_stage, "dp": index.dp_degree,
                       "tp": index.tp_degree, "pp": index.pp_degree, "files": len(files.sources),
                       "bytes": files.total_bytes, "params": len(index.params), "elements": index.total_numel,
                       "fp32_only_folders": len(index.fallbacks), "tied_aliases": dict(index.aliases),
                       "injected_universal_checkpoint_info": index.injected_uc_info},
        "plan": {"world_size": world, "waves": len(plan.waves), "budget_bytes": plan.budget_bytes,
                 "ranks": plan.rank_summary(index)},
        "backend": comm.backend,
        "notes": list(index.notes),  # warnings, e.g. AutoEP expert moments skipped
    }
    if cfg.dry_run:
        if rank == 0 and not cfg.log.quiet:
            print(describe(index, plan), file=sys.stdout, flush=True)
        report["dry_run"] = True
        return report

    out = OutputFolder(cfg.output_folder, cfg.io.threads)
    read_bytes = 0
    try:
        with _Phase(comm, timings, "prepare_output"):
            if rank == 0:
                out.prepare()
        progress.log(f"ZeRO-{index.zero_stage} checkpoint, dp={index.dp_degree}: {len(index.params)} parameters, "
                     f"{len(plan.waves)} wave(s)")
        for s, writer in plan.copy_writers.items():  # model files, independent of the rest: they overlap it
            if writer == rank:
                read_bytes += files.sources[s].nbytes
                if index.autoep_uc is None:
                    out.copy(files.sources[s].path)
                else:  # with expert metadata added
                    out.save(_with_autoep_info(shards[s], *index.autoep_uc), os.path.basename(files.sources[s].path))
        aliases_of: Dict[str, List[str]] = {}
        for alias, canonical in index.aliases.items():
            aliases_of.setdefault(canonical, []).append(alias)
        for wave in plan.waves:
            with _Phase(comm, timings, "pack"):
                send, counts = _pack(wave, index, plan, shards, rank, fds)
                read_bytes += 4 * sum(wave.count(index, rank, d) for d in range(world))
            t0 = time.monotonic()
            recv = comm.all_to_all(send, counts, [_send_counts(wave, index, s, rank) for s in range(world)])
            timings["exchange"] = timings.get("exchange", 0.0) + time.monotonic() - t0
            del send
            with _Phase(comm, timings, "merge_write"):
                for p, flats in _assemble(wave, index, plan, recv, shards, rank, fds):
                    _write_param(out, index, p, flats, aliases_of)
                del recv
                out.flush()
            progress.update(len(wave.params), sum(param_bytes(index.params[p].numel) for p in wave.params))
        with _Phase(comm, timings, "other_files"):
            for i, fb in enumerate(index.fallbacks):
                if plan.fallback_writers[i] == rank:
                    tensor = shards[fb.source][C.MODULE_KEY][fb.name]
                    read_bytes += tensor.nbytes
                    out.save_param(fb.name, {C.FP32_WEIGHT_KEY: fallback_payload(tensor)})
            if plan.optimizer_state_writer == rank:
                out.save(_optimizer_state(index, shards[index.optimizer_state_source]), C.UNIVERSAL_ZERO_FOLDER,
                         C.UNIVERSAL_OPTIMIZER_STATE_FILE)
            out.flush()
        progress.update(0, 0, final=True)
        mine = {"rank": rank, "opened": opened, "read_bytes": read_bytes, "written_bytes": out.bytes_written,
                "files_written": out.files_written,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        report["ranks"] = comm.all_gather_object(mine)
        timings["total"] = time.monotonic() - t_start
        report["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
        with _Phase(comm, timings, "publish"):
            if rank == 0:
                _write_report(out, report, cfg)
                report["latest_universal"] = out.publish()
    except BaseException:
        if rank == 0:
            out.abort()
        raise
    finally:
        out.close()
    progress.log(f"done in {timings['total']:.2f}s: {len(index.params)} parameters, "
                 f"{sum(r['written_bytes'] for r in report['ranks']) / 2**20:.1f} MiB written -> {out.final}")
    return report


def _write_report(out: OutputFolder, report: Dict[str, Any], cfg):
    import json

    from ..options import to_plain

    report["config"] = to_plain(cfg)
    text = json.dumps(report, indent=2, default=str)
    with open(os.path.join(out.partial, C.REPORT_FILE), "w") as f:
        f.write(text)
    if cfg.log.json:
        with open(cfg.log.json, "w") as f:
            f.write(text)
