"""The collectives uckpt needs, over torch.distributed (or nothing, for one process).

Control traffic (metadata, error agreement) uses object collectives; bulk fragments use one
``all_to_all_single`` of fp32 per wave. With NCCL the fragment buffers travel on the GPU. Every
collective runs under the process group's timeout, and ``agree`` makes all ranks fail together
with the same cause.

Fragment buffers are plain bytes (``bytearray``): the one-process :class:`Comm` hands them back
untouched and never imports torch; :class:`TorchComm` wraps them as tensors without copying.
"""
import datetime
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from ..errors import RemoteError, UckptError
from ..torchsave.format import as_fp32_tensor, torch_loaded


class Comm:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1
    backend = "none"
    calls = 0  # collectives joined (none here: one process has no one to wait for)
    sent_bytes = 0  # fragment bytes sent to other ranks

    def all_gather_object(self, obj: Any) -> List[Any]:
        return [obj]

    def all_to_all(self, send: bytearray, send_counts: Sequence[int], recv_counts: Sequence[int]) -> bytearray:
        """Exchange fp32 elements: ``send`` holds ``send_counts[d]`` elements for each rank ``d`` in order;
        returns ``recv_counts[s]`` elements from each rank ``s``."""
        return send

    def barrier(self):
        pass

    def close(self):
        pass

    def agree(self, error: Optional[BaseException]):
        """Raise on every rank if any rank failed: the local error where there is one, else the first remote one."""
        states = self.all_gather_object(None if error is None else _describe(error))
        if error is not None:
            raise error
        for r, state in enumerate(states):
            if state is not None:
                raise RemoteError(f"converter rank {r} failed: {state}")


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, UckptError) else f"{type(error).__name__}: {error}"


class TorchComm(Comm):
    """torch.distributed process group; ``data_device`` is where the fragment buffers travel."""

    def __init__(self, group=None, data_group=None, data_device: str = "cpu", owns_group: bool = False):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist  # imported here: a one-process conversion never needs them
        self.group = group
        self.data_group = data_group if data_group is not None else group
        self.data_device = torch.device(data_device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(self.data_group))
        self._owns = owns_group

    def all_gather_object(self, obj: Any) -> List[Any]:
        self.calls += 1
        out: List[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_to_all(self, send: bytearray, send_counts: Sequence[int], recv_counts: Sequence[int]) -> bytearray:
        self.calls += 1
        self.sent_bytes += 4 * (sum(send_counts) - send_counts[self.rank])
        recv_host = bytearray(4 * sum(recv_counts))
        recv_cpu = as_fp32_tensor(recv_host)
        recv = recv_cpu if self.data_device.type == "cpu" else self.torch.empty_like(recv_cpu, device=self.data_device)
        self.dist.all_to_all_single(recv, as_fp32_tensor(send).to(self.data_device), list(recv_counts), list(send_counts),
                               group=self.data_group)
        if recv is not recv_cpu:
            recv_cpu.copy_(recv)
        return recv_host

    def barrier(self):
        self.calls += 1
        self.dist.barrier(group=self.group)

    def close(self):
        if self._owns and self.dist.is_initialized():
            self.dist.destroy_process_group()


def setup(backend: str = "auto", timeout_s: float = 600.0) -> Comm:
    """The Comm for this process: an existing process group, a new one under torchrun, or none.

    ``backend="auto"``: gloo carries control traffic; fragments use NCCL when every rank has a CUDA
    device (decided together, so ranks never disagree), gloo otherwise.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch_loaded():  # only a process that imported torch can hold a process group
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            pg_backend = str(dist.get_backend())
            import torch
            device = f"cuda:{torch.cuda.current_device()}" if pg_backend == "nccl" else "cpu"
            return TorchComm(data_device=device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Comm()
    if backend not in ("auto", "gloo", "nccl"):
        raise UckptError(f"unknown backend {backend!r}", fix="use auto, gloo or nccl")
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timeout)
    comm = TorchComm(owns_group=True)
    if backend == "gloo":
        return comm
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    has_cuda = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    everyone = all(comm.all_gather_object(has_cuda))
    if backend == "nccl" and not everyone:
        comm.close()
        raise UckptError("backend nccl needs a CUDA device on every rank, and some rank has none",
                         fix="use backend=auto or gloo")
    if everyone:
        torch.cuda.set_device(local_rank)
        comm.data_group = dist.new_group(backend="nccl", timeout=timeout)
        comm.data_device = torch.device(f"cuda:{local_rank}")
        comm.backend = "nccl"
    return comm


class Phase:
    """Run a block of local work, time it into ``timings[name]``, and turn any exception into an
    agreement across ranks: every rank leaves the block raising, or none does."""

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
