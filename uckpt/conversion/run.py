"""Distributed conversion of a DeepSpeed ZeRO checkpoint into a Universal checkpoint.

Phases (each ends with an agreement, so all ranks fail together with the same cause):
  1. discover files by name; check the output location        (every rank, no tensor reads)
  2. open own shards lazily; share their metadata             (all_gather_object)
  3. build the index and the plan                             (pure, identical on every rank)
  4. per wave: pack own fragments -> all_to_all -> owners assemble and write
  5. files with no fragments (fallbacks, optimizer_state.pt, model-file copies), report, publish

Fragments come from a :class:`~uckpt.conversion.source.FragmentSource` and files go to an
:class:`~uckpt.conversion.output.OutputSink`: the two seams where an in-job save plugs in.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

from .. import __version__
from ..dsformat import constants as C
from ..dsformat.compat import check_deepspeed
from ..dsformat.files import CheckpointFiles
from ..dsformat.index import CheckpointIndex, build_index
from ..dsformat.shards import source_meta
from ..errors import UckptError
from ..options import ConvertConfig
from ..torchsave.reader import EXPECTED_STAND_INS
from ..torchsave.stats import IO
from ..torchsave.writer import payload_bytes
from . import exchange, payloads, report as reportmod
from .comm import Comm, Phase
from .inputs import FolderInput, NativeInput
from .output import OutputFolder, OutputSink
from .plan import ConvertPlan, describe, make_plan, param_bytes
from .progress import Progress
from .source import FragmentSource, ShardFiles


@dataclass
class _Run:
    """What one rank's conversion holds between phases."""

    cfg: ConvertConfig
    comm: Comm
    progress: Progress
    timings: Dict[str, float] = field(default_factory=dict)
    opened: List[str] = field(default_factory=list)  # shard files this rank read
    unknown_globals: Set[str] = field(default_factory=set)  # read as inert stand-ins (every rank's)
    crc_bytes: int = 0  # input bytes this rank checked against their CRC-32
    resumed: Optional[Dict[str, Any]] = None  # the dead run's partial folder this one finished, and what it reused
    read_bytes: int = 0

    def phase(self, name: str) -> Phase:
        return Phase(self.comm, self.timings, name)


@dataclass
class Opened:
    """A native checkpoint opened by every rank of one run: its files, the shards this rank holds
    (tensors left where they are), every file's metadata, the index and the plan."""

    r: _Run
    inp: NativeInput
    files: CheckpointFiles
    shards: Dict[int, Any]
    index: CheckpointIndex
    plan: ConvertPlan
    source: FragmentSource
    ds_note: Optional[str] = None

    def close(self):
        self.source.close()


def open_native(cfg, comm: Comm, inp: Optional[NativeInput] = None, stream=None, checks_output: bool = True,
                states=C.TENSOR_STATES, owner_groups=None, action: str = "converting") -> Opened:
    """Discover, read metadata, check CRCs, index and plan, on every rank (each phase agreed).
    ``cfg`` needs ``input_folder``, ``output_folder``, ``overwrite``, ``verify_crc``, ``memory`` and
    ``log``; ``states``: what the exchange will move; ``owner_groups(index)``: parameters that need
    one owner."""
    inp = inp if inp is not None else FolderInput(cfg.input_folder)
    r = _Run(cfg, comm, Progress(0, 0, enabled=(comm.rank == 0 and not cfg.log.quiet), stream=stream or sys.stderr))
    r.progress.log(f"uckpt {__version__}: {action} {inp.label} -> {cfg.output_folder} "
                   f"on {comm.world_size} rank(s) (backend {comm.backend})")
    ds_note = check_deepspeed()  # a warning outside the DeepSpeed releases the format was verified against
    files = _discover(r, inp, checks_output)
    shards, metas, readers = _read_metadata(r, files, inp)
    _verify_crc(r, files, inp)
    index, plan = _plan(r, files, metas, readers, states, owner_groups)
    return Opened(r, inp, files, shards, index, plan, ShardFiles(shards, files.family), ds_note)


def run(cfg: ConvertConfig, comm: Comm, stream=None, inp: Optional[NativeInput] = None) -> Dict[str, Any]:
    """Convert ``inp`` (default: the tag folder ``cfg.input_folder``) into ``cfg.output_folder`` on all
    ranks of ``comm``; returns the report."""
    t_start, io_start = time.monotonic(), IO.snapshot()
    o = open_native(cfg, comm, inp, stream, checks_output=not cfg.dry_run)
    r, inp, index, plan = o.r, o.inp, o.index, o.plan
    report = reportmod.header(cfg, index, plan, comm.backend, inp.label)
    report["unknown_globals"] = sorted(r.unknown_globals)
    if o.ds_note:
        report["notes"].append(o.ds_note)
    if cfg.dry_run:
        if comm.rank == 0 and not cfg.log.quiet:
            print(describe(index, plan), file=sys.stdout, flush=True)
        report["dry_run"] = True
        return report
    run_id = comm.all_gather_object(os.urandom(8).hex())[0]  # rank 0's: one partial folder name for all ranks
    out = OutputFolder(cfg.output_folder, cfg.io.threads, run_id=run_id, overwrite=cfg.overwrite,
                       wait_for_lock=cfg.wait_for_lock)
    try:
        _write(o, out)
        report["ranks"] = comm.all_gather_object(reportmod.rank_io(
            comm.rank, r.opened, r.read_bytes, out.bytes_written, out.files_written, IO.since(io_start), r.crc_bytes,
            out.payload_bytes, comm.sent_bytes, comm.calls))
        if r.resumed:
            report["resumed"] = r.resumed
        r.timings["total"] = time.monotonic() - t_start
        report["timings_s"] = {k: round(v, 4) for k, v in r.timings.items()}
        with r.phase("publish"):
            if comm.rank == 0:
                reportmod.write(out.partial, report, cfg)
                report["latest_universal"] = out.finish()
    except BaseException as exc:
        if comm.rank == 0:  # a refusal removes the partial folder; a run cut short leaves it to be resumed
            out.abort(keep=not isinstance(exc, UckptError) and inp.resumable)
        raise
    finally:
        out.close()
        o.close()
    r.progress.log(f"done in {r.timings['total']:.2f}s: {len(index.params)} parameters, "
                   f"{sum(x['written_bytes'] for x in report['ranks']) / 2**20:.1f} MiB written -> {out.final}")
    return report


def _discover(r: _Run, inp: NativeInput, checks_output: bool) -> CheckpointFiles:
    with r.phase("discover"):
        files = inp.files(r.comm)
        if checks_output:
            inp.check_output(r.cfg.output_folder, r.cfg.overwrite)
    return files


def _read_metadata(r: _Run, files: CheckpointFiles, inp: NativeInput):
    """Each rank opens the shards it reads (pickles only) and every rank gets every file's metadata."""
    readers = inp.readers(files, r.comm)
    shards: Dict[int, Any] = {}
    metas: Dict[int, Any] = {}
    seen: Set[str] = set()  # globals the shards name that became inert stand-ins
    with r.phase("read_metadata"):
        for s in files.sources:
            if readers[s.index] == r.comm.rank:
                shards[s.index] = inp.open(s, seen)
                r.opened.append(s.path)
                metas[s.index] = source_meta(s, shards[s.index], files.family)
    for part, names in r.comm.all_gather_object((metas, sorted(seen))):
        metas.update(part)
        r.unknown_globals.update(set(names) - EXPECTED_STAND_INS)
    if r.unknown_globals:
        r.progress.log(f"warning: the checkpoint names globals uckpt does not know; they were read as inert "
                       f"stand-ins, never called: {', '.join(sorted(r.unknown_globals))}")
    return shards, metas, readers


def _verify_crc(r: _Run, files: CheckpointFiles, inp: NativeInput):
    """Every record of the shards this rank read, and of its share of the files no rank reads (pipeline
    layer and per-expert files), against its CRC-32: damaged bytes are an error naming the file, never
    a published folder holding them."""
    if not r.cfg.verify_crc or getattr(r.cfg, "dry_run", False):
        return
    with r.phase("verify_crc"):
        unread = files.unread_share(r.comm.rank, r.comm.world_size)
        r.crc_bytes = inp.verify(r.opened + unread)


def _plan(r: _Run, files: CheckpointFiles, metas, readers: List[int], states, owner_groups):
    with r.phase("plan"):
        # an export writes no model file, so it needs no universal_checkpoint_info of the checkpoint's own
        index = build_index(files, metas, getattr(r.cfg, "inject_missing_state", True), getattr(r.cfg, "strict", True))
        plan = make_plan(index, r.comm.world_size, int(r.cfg.memory.budget_mb) << 20, readers, states,
                         owner_groups(index) if owner_groups else ())
    for note in index.notes:
        r.progress.log(note)
    r.progress.total_params = len(index.params)
    r.progress.total_bytes = sum(param_bytes(p.numel) for p in index.params)
    return index, plan


def _resume_key(cfg: ConvertConfig, inp: NativeInput) -> Optional[Dict[str, Any]]:
    """What must be unchanged for a rerun to trust files an earlier run of the same command wrote: the
    input files (by name, size and modification time), the options that change the output, uckpt."""
    key = inp.resume_key()
    if key is None:
        return None
    return dict(key, uckpt=__version__, inject_missing_state=cfg.inject_missing_state, strict=cfg.strict)


def _resume(r: _Run, index: CheckpointIndex, plan: ConvertPlan, out: OutputSink, adopted) -> ConvertPlan:
    """After a crash: the parameters the dead run wrote, checked by their owners, are not converted again."""
    if adopted is None:
        return plan
    aliases_of: Dict[str, List[str]] = {}
    for alias, canonical in index.aliases.items():
        aliases_of.setdefault(canonical, []).append(alias)
    with r.phase("resume"):
        mine = [p.name for i, p in enumerate(index.params) if plan.owners[i] == r.comm.rank]
        intact = out.reusable(mine + [a for name in mine for a in aliases_of.get(name, ())])
        ok = [name for name in mine if name in intact and all(a in intact for a in aliases_of.get(name, ()))]
    done = {name for part in r.comm.all_gather_object(ok) for name in part}
    indices = {i for i, p in enumerate(index.params) if p.name in done}
    r.resumed = {"from": adopted, "params_reused": len(indices)}
    r.progress.log(f"resuming {adopted}: {len(indices)} of {len(index.params)} parameters already written and intact")
    r.progress.update(len(indices), sum(param_bytes(index.params[i].numel) for i in indices))
    return plan.without(indices)


def _write(o: Opened, out: OutputSink):
    r, index, plan, inp = o.r, o.index, o.plan, o.inp
    adopted = None
    with r.phase("prepare_output"):
        if r.comm.rank == 0:
            key = _resume_key(r.cfg, inp)
            adopted = out.prepare(key, r.cfg.restart or key is None)
    plan = o.plan = _resume(r, index, plan, out, r.comm.all_gather_object(adopted)[0])
    r.progress.log(f"ZeRO-{index.zero_stage} checkpoint, dp={index.dp_degree}: {len(index.params)} parameters, "
                   f"{len(plan.waves)} wave(s)")
    with r.phase("model_files"):  # queued on writer threads (large ones): they overlap the rest
        _model_files(r, index, plan, o.shards, out, inp)
    aliases_of: Dict[str, List[str]] = {}
    for alias, canonical in index.aliases.items():
        aliases_of.setdefault(canonical, []).append(alias)

    def write(spec, flats):
        # a parameter split by state (plan.make_waves) arrives in parts; the last one completes it
        out.write_param(spec.name, payloads.param_files(spec, flats), complete=o.plan.states[-1] in flats)
        if C.FP32_WEIGHT_KEY in flats:
            for alias in aliases_of.get(spec.name, ()):
                out.write_param(alias, {C.FP32_WEIGHT_KEY: payloads.alias_payload(spec, flats[C.FP32_WEIGHT_KEY])})

    each_assembled(o, write, out.flush)
    with r.phase("other_files"):
        _other_files(r, index, plan, o.shards, out)
        out.flush()
    with r.phase("fsync"):
        out.sync()
    r.progress.update(0, 0, final=True)


def _model_files(r: _Run, index: CheckpointIndex, plan: ConvertPlan, shards, out: OutputSink, inp: NativeInput):
    sources = index.files.sources
    for s, writer in plan.copy_writers.items():
        if writer == r.comm.rank:
            r.read_bytes += sources[s].nbytes
            add_info = None if index.autoep_uc is None else \
                (lambda sd: payloads.with_autoep_info(sd, *index.autoep_uc))  # with expert metadata added
            inp.model_file(sources[s], shards[s], out, add_info)


def each_assembled(o: Opened, handle, after_wave=None):
    """Run the plan's waves: pack this rank's fragments for other owners, exchange, and call
    ``handle(spec, {state: flat fp32 bytes})`` for each parameter this rank owns as soon as it is
    complete (inside the wave's agreed phase), then ``after_wave()``."""
    r, index, plan, source = o.r, o.index, o.plan, o.source
    rank, world = r.comm.rank, r.comm.world_size
    for wave in plan.waves:
        with r.phase("pack"):
            send, counts = exchange.pack(wave, index, plan, source, rank)
            r.read_bytes += 4 * sum(wave.count(index, rank, d) for d in range(world))
        t0 = time.monotonic()
        recv = r.comm.all_to_all(send, counts, [exchange.send_count(wave, index, s, rank) for s in range(world)])
        r.timings["exchange"] = r.timings.get("exchange", 0.0) + time.monotonic() - t0
        del send
        with r.phase("merge_write"):
            for p, flats in exchange.assemble(wave, index, plan, recv, source, rank):
                handle(index.params[p], flats)
                flats = None  # else the loop variable keeps the wave's last parameter alive into the next wave
            del recv
            if after_wave is not None:
                after_wave()
        share = len(plan.moved(wave)) / len(plan.states)
        r.progress.update(len(wave.params) if plan.completes(wave) else 0,
                          int(share * sum(param_bytes(index.params[p].numel) for p in wave.params)))


def _other_files(r: _Run, index: CheckpointIndex, plan: ConvertPlan, shards, out: OutputSink):
    """The fp32-only folders (frozen parameters, buffers) and ``zero/optimizer_state.pt``."""
    for i, fb in enumerate(index.fallbacks):
        if plan.fallback_writers[i] == r.comm.rank:
            tensor = shards[fb.source][C.MODULE_KEY][fb.name]
            r.read_bytes += tensor.nbytes
            out.write_param(fb.name, {C.FP32_WEIGHT_KEY: payloads.fallback_payload(tensor)})
    if plan.optimizer_state_writer == r.comm.rank:
        state = payloads.optimizer_state(index, shards[index.optimizer_state_source])
        r.read_bytes += payload_bytes(state)  # ZeRO-3: DeepSpeed keeps the whole partition in it
        out.write_file(state, C.UNIVERSAL_ZERO_FOLDER, C.UNIVERSAL_OPTIMIZER_STATE_FILE)
