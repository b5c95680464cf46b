"""The files ``engine.save_checkpoint`` would write, taken in memory instead.

DeepSpeed builds every file's state dict (model states, ZeRO optimizer partitions, per-expert and
pipeline layer files) and hands each to its checkpoint engine's ``save``. A capturing checkpoint
engine keeps the dicts and writes nothing, so the dicts are exactly the ones a save would write:
the same keys, client state, ``ds_config`` and metadata, with tensors that are the engine's own
(live) partitions. The only file DeepSpeed writes outside its checkpoint engine in a save (the
``zero_to_fp32.py`` recovery script) is skipped; ``save_latest=False`` skips ``latest``.
"""
import os
from typing import Any, Dict, Optional

from ..errors import UnsupportedEngineError
from ..torchsave.format import map_leaves


def _capturing_engine():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class CapturingCheckpointEngine(CheckpointEngine):
        """DeepSpeed's checkpoint-engine interface, keeping each saved dict by file name."""

        def __init__(self):
            super().__init__(config_params=None)
            self.files: Dict[str, Dict[str, Any]] = {}

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            self.files[os.path.basename(path)] = state_dict

        def makedirs(self, path, exist_ok=False):
            pass

        def load(self, path: str, map_location=None):
            raise RuntimeError(f"an in-job save reads no file ({path})")

        def commit(self, info):
            return True

    return CapturingCheckpointEngine()


def check_engine(engine):
    """Refuse engines whose state the Universal format cannot hold, naming what to change."""
    if not hasattr(engine, "save_checkpoint") or not hasattr(engine, "optimizer"):
        raise UnsupportedEngineError(f"{type(engine).__name__} is not a DeepSpeed engine",
                                     fix="pass the engine deepspeed.initialize returned")
    if engine.zero_nvme_offload_optimizer():
        raise UnsupportedEngineError("NVMe optimizer offload keeps the optimizer state in swap files, which an "
                                     "in-job save does not read",
                                     fix="save with engine.save_checkpoint and convert with uckpt convert, or "
                                         "offload the optimizer to the CPU (offload_optimizer.device: cpu)")
    base = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    name = type(base).__name__ if base is not None else type(engine.optimizer).__name__
    if base is None or "adam" not in name.lower():
        raise UnsupportedEngineError(f"the optimizer is {name}: the Universal format stores Adam-family moments "
                                     "(exp_avg, exp_avg_sq) and DeepSpeed's converter refuses other optimizers",
                                     fix="train with Adam or AdamW under ZeRO stage 1, 2 or 3")
    if not engine.zero_optimization() and not engine.bfloat16_enabled():
        raise UnsupportedEngineError("the engine has no ZeRO optimizer: its save holds no fp32 partitions",
                                     fix="enable zero_optimization (stage 1, 2 or 3)")


def capture(engine, save_dir: str, tag: str, client_state: Optional[Dict[str, Any]] = None,
            exclude_frozen_parameters: bool = False) -> Dict[str, Dict[str, Any]]:
    """This rank's files of ``engine.save_checkpoint(save_dir, tag, client_state)``: file name -> state
    dict. Every rank calls it (DeepSpeed's save runs collectives); nothing is written."""
    check_engine(engine)
    capturing, saved = _capturing_engine(), engine.checkpoint_engine
    engine.checkpoint_engine = capturing
    engine._copy_recovery_script = lambda save_path: None  # shadows the method on this instance only
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen_parameters)
    finally:
        engine.checkpoint_engine = saved
        engine.__dict__.pop("_copy_recovery_script", None)
    return capturing.files


class HostBuffers:
    """Host tensors for snapshots, kept between saves of one process: a job that saves every few
    hundred steps copies into memory it already touched (and pinned) instead of faulting in fresh
    pages each time, which costs as much as the copy. A buffer is handed out again only after the
    save that used it has finished (:meth:`release`)."""

    def __init__(self):
        self._free: Dict[tuple, list] = {}

    def take(self, shape, dtype, pinned: bool):
        import torch

        free = self._free.get((tuple(shape), dtype, pinned))
        if free:
            return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)

    def release(self, tensors):
        for t in tensors:
            self._free.setdefault((tuple(t.shape), t.dtype, t.is_pinned()), []).append(t)


def snapshot(files: Dict[str, Dict[str, Any]], buffers: Optional[HostBuffers] = None):
    """``files`` with every tensor copied to host memory once (pinned when it lives on a GPU), so later
    steps, which change parameters and moments in place, cannot reach what is being written. Tensors
    shared between files are copied once. Returns the copied files and the host tensors used (for
    ``buffers.release`` once written)."""
    import torch

    copies: Dict[int, Any] = {}
    used = []
    on_gpu = False
    buffers = buffers or HostBuffers()

    def copy(obj):
        nonlocal on_gpu
        if not isinstance(obj, torch.Tensor):
            return _detached(obj, copies)
        if id(obj) not in copies:
            src = obj.detach()
            on_gpu = on_gpu or src.device.type != "cpu"
            out = buffers.take(src.shape, src.dtype, pinned=src.device.type == "cuda")
            used.append(out)
            out.copy_(src, non_blocking=src.device.type == "cuda")
            copies[id(obj)] = (torch.nn.Parameter(out, requires_grad=obj.requires_grad)
                               if isinstance(obj, torch.nn.Parameter) else out)
        return copies[id(obj)]

    out = {name: map_leaves(sd, copy) for name, sd in files.items()}
    if on_gpu:
        torch.cuda.synchronize()
    return out, used


def _detached(obj, copies: Dict[int, Any]):
    """A non-tensor value of the captured files as it is now: a deep copy (the job goes on changing its
    objects, e.g. a loss scaler, while the background save pickles them), sharing the snapshot's
    tensor copies; the object itself where it cannot be copied (a lock, a handle)."""
    import copy as copymod

    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    memo = {key: value for key, value in copies.items()}
    try:
        return copymod.deepcopy(obj, memo)
    except Exception:  # noqa: BLE001 - kept by reference, as a blocking save would write it
        return obj


def snapshot_bytes(files: Dict[str, Dict[str, Any]]) -> int:
    from ..torchsave.writer import payload_bytes

    return sum(payload_bytes(sd) for sd in files.values())
