"""``uckpt.save_universal``: every rank of a live DeepSpeed job writes a Universal checkpoint from
memory, blocking or in the background, with the offline converter's plan, exchange and output.

The files ``engine.save_checkpoint`` would write are captured in memory (:mod:`.capture`) and
converted as a :class:`~uckpt.conversion.inputs.MemoryInput`: each rank reads only what it holds,
the exchange moves fragments to their owners, owners write, rank 0 publishes the folder with one
rename and names it in ``latest_universal``. No native checkpoint is written or read.

Blocking, the conversion reads the engine's partitions in place (no copy beyond the converter's
memory budget). In the background, the call copies its own partitions to host memory once (a
snapshot), returns, and a thread converts the snapshot while training goes on; the thread's
collectives run on process groups of their own (gloo), never on the training job's.
"""
import datetime
import logging
import os
import threading
import time
from typing import Any, Dict, Optional

from ..conversion import comm as commmod
from ..conversion.comm import Phase
from ..conversion.inputs import MemoryInput
from ..conversion.output import check_output
from ..conversion.run import run
from ..dsformat.compat import check_deepspeed
from ..dsformat.universal import check_name
from ..errors import UckptError
from .. import options as optmod
from .capture import HostBuffers, capture, check_engine, snapshot, snapshot_bytes

logger = logging.getLogger("uckpt")
_lock = threading.Lock()
_in_flight: Optional["SaveHandle"] = None
_groups: Dict[Any, Any] = {}
_calls = 0
_buffers = HostBuffers()  # snapshot memory reused by this process's later background saves


class SaveHandle:
    """A background ``save_universal``: :meth:`wait` returns its report, or raises its error on every
    rank (the ranks agree on failures, as in a conversion)."""

    def __init__(self, target, blocked_s: float, t0: float):
        self.blocked_s, self._t0 = blocked_s, t0
        self._report: Optional[Dict[str, Any]] = None
        self._error: Optional[BaseException] = None
        # not a daemon: a script that ends without wait() still finishes (and publishes) the save
        self._thread = threading.Thread(target=self._run, args=(target,), name="uckpt-save-universal")
        self._thread.start()

    def _run(self, target):
        try:
            self._report = target()
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"save_universal still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._report


def _join(rank: int, world: int, timeout_s: float):
    """Every rank must call: wait (up to ``timeout_s``) for all ranks to reach this call, through the
    job's rendezvous store, and name the ranks that did not, instead of hanging in a collective."""
    global _calls
    import torch.distributed as dist

    _calls += 1
    store = dist.distributed_c10d._get_default_store()
    key = f"uckpt/save_universal/{_calls}"
    store.set(f"{key}/{rank}", b"1")
    keys = [f"{key}/{r}" for r in range(world)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
        return
    except Exception:  # noqa: BLE001 - the store's timeout (its type differs across torch releases)
        missing = [r for r in range(world) if not store.check([keys[r]])]
        if not missing:
            return
    raise UckptError(f"save_universal must be called on every rank: rank(s) {missing[:16]} of {world} did not "
                     f"call it within {timeout_s:g} s (dist.timeout_s)",
                     fix="call uckpt.save_universal on all ranks, at the same point of the training loop")


def _comm(timeout_s: float, background: bool) -> commmod.TorchComm:
    """Process groups of this job's ranks for the save (made once per process, every rank in the same
    order): gloo for control; for fragments NCCL when the job runs on GPUs and the save blocks, gloo in
    the background (its buffers are on the host, and NCCL calls beside the job's could deadlock)."""
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    key = ("control", timeout_s)
    if key not in _groups:
        _groups[key] = dist.new_group(backend="gloo", timeout=timeout)
    control = _groups[key]
    nccl = str(dist.get_backend()) == "nccl" and torch.cuda.is_available() and not background
    if not nccl:
        return commmod.TorchComm(group=control)
    if ("nccl", timeout_s) not in _groups:
        _groups[("nccl", timeout_s)] = dist.new_group(backend="nccl", timeout=timeout)
    return commmod.TorchComm(group=control, data_group=_groups[("nccl", timeout_s)],
                             data_device=f"cuda:{torch.cuda.current_device()}")


def save_universal(engine, save_dir: str, tag: Optional[str] = None, *, blocking: bool = True,
                   client_state: Optional[Dict[str, Any]] = None, exclude_frozen_parameters: bool = False,
                   config: Optional[str] = None, **options: Any):
    """Write a Universal checkpoint of ``engine``'s current state to ``<save_dir>/<tag>``; every rank calls it.

    ``tag=None`` means ``global_step<engine.global_steps>_universal``. When the folder is complete it
    appears at once (one rename) and ``<save_dir>/latest_universal`` names it, as after ``uckpt
    convert``. ``options`` are the converter's (``memory={"budget_mb": 512}``, ``io={"threads": 8}``,
    ``dist={"timeout_s": 120}``, ``overwrite=True``, ``log={"quiet": True, "json": path}``; or an
    omegaconf YAML as ``config``). ``inject_missing_state`` defaults to ``True`` here: the model-state
    file gets the ``universal_checkpoint_info`` a resume needs when the job has none, as
    ``ds_to_universal.py --inject_missing_state`` adds it. ``client_state`` is stored in the
    model-state file as ``engine.save_checkpoint`` stores it.

    ``blocking=True`` returns the report when the folder is published. ``blocking=False`` returns a
    :class:`SaveHandle` once the state is snapshotted to host memory; ``handle.wait()`` returns the
    report or raises the background save's error (on every rank). A second call while one is in flight
    first waits for it. The report's ``in_job`` entry has the time training was blocked and the total.
    """
    global _in_flight
    import torch.distributed as dist

    t0 = time.monotonic()
    check_deepspeed()
    with _lock:
        previous, _in_flight = _in_flight, None
    if previous is not None:
        try:
            previous.wait()
        except BaseException as exc:  # noqa: BLE001 - also raised by that save's own wait()
            logger.warning("uckpt: the previous background save_universal failed: %s", exc)
    if not (dist.is_available() and dist.is_initialized()):
        raise UckptError("save_universal runs inside a distributed DeepSpeed job (no process group is initialised)",
                         fix="call it after deepspeed.initialize, on every rank")
    tag = check_name(str(tag if tag is not None else f"global_step{engine.global_steps}_universal"), "tag")
    output = os.path.join(save_dir, tag)
    # a resume needs universal_checkpoint_info in the model-state file: added where the job has none
    values = dict({"inject_missing_state": True}, **options, input_folder=os.path.join(save_dir, tag),
                  output_folder=output)
    cfg = optmod.build(config, values=values)
    rank, world = dist.get_rank(), dist.get_world_size()
    _join(rank, world, float(cfg.dist.timeout_s))
    comm = _comm(float(cfg.dist.timeout_s), background=not blocking)
    phases: Dict[str, float] = {}  # each phase ends in an agreement: one rank's failure stops every rank
    with Phase(comm, phases, "checks"):  # refusals every rank sees before anything is captured
        check_engine(engine)
        check_output(output, cfg.overwrite)  # every rank: each names the cause itself
    t_capture = time.monotonic()
    files = capture(engine, save_dir, tag, client_state, exclude_frozen_parameters)
    timings = {"prepare_s": round(t_capture - t0, 4), "capture_s": round(time.monotonic() - t_capture, 4)}
    if blocking:
        with Phase(comm, phases, "view"):
            inp = MemoryInput(output, files)
        report = run(cfg, comm, inp=inp)
        total = time.monotonic() - t0
        report["in_job"] = dict(timings, blocking=True, blocked_s=round(total, 4), total_s=round(total, 4))
        return report
    with Phase(comm, phases, "snapshot"):  # one rank out of memory: all stop
        copied, used = snapshot(files, _buffers)
        held = [MemoryInput(output, copied)]  # handed over (and dropped) by the thread
    nbytes = snapshot_bytes(copied)
    del files, copied  # the thread holds the only reference to the snapshot
    blocked = time.monotonic() - t0
    timings["snapshot_s"] = round(phases["snapshot"], 4)

    def convert():
        try:
            report = run(cfg, comm, inp=held.pop())
        finally:
            _buffers.release(used)  # written (or failed): the next snapshot may reuse them
        report["in_job"] = dict(timings, blocking=False, blocked_s=round(blocked, 4),
                                total_s=round(time.monotonic() - t0, 4), snapshot_bytes=nbytes)
        return report

    handle = SaveHandle(convert, blocked, t0)
    with _lock:
        _in_flight = handle
    return handle
