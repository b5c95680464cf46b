"""The collectives uckpt needs, over torch.distributed (or nothing, for one process).

Control traffic (metadata, error agreement) uses object collectives; bulk fragments use one
``all_to_all_single`` of fp32 per wave. With NCCL the fragment buffers travel on the GPU. Every
collective runs under the process group's timeout, and ``agree`` makes all ranks fail together
with the same cause.
"""
import datetime
import os
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from .errors import RemoteError, UckptError


class Comm:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1
    backend = "none"

    def all_gather_object(self, obj: Any) -> List[Any]:
        return [obj]

    def all_to_all(self, send: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]) -> torch.Tensor:
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
        self.group = group
        self.data_group = data_group if data_group is not None else group
        self.data_device = torch.device(data_device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(self.data_group))
        self._owns = owns_group

    def all_gather_object(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_to_all(self, send: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]) -> torch.Tensor:
        recv = torch.empty(sum(recv_counts), dtype=send.dtype, device=self.data_device)
        dist.all_to_all_single(recv, send.to(self.data_device), list(recv_counts), list(send_counts), group=self.data_group)
        return recv.cpu()

    def barrier(self):
        dist.barrier(group=self.group)

    def close(self):
        if self._owns and dist.is_initialized():
            dist.destroy_process_group()


def setup(backend: str = "auto", timeout_s: float = 600.0) -> Comm:
    """The Comm for this process: an existing process group, a new one under torchrun, or none.

    ``backend="auto"``: gloo carries control traffic; fragments use NCCL when every rank has a CUDA
    device (decided together, so ranks never disagree), gloo otherwise.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_available() and dist.is_initialized():
        pg_backend = str(dist.get_backend())
        device = f"cuda:{torch.cuda.current_device()}" if pg_backend == "nccl" else "cpu"
        return TorchComm(data_device=device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Comm()
    if backend not in ("auto", "gloo", "nccl"):
        raise UckptError(f"unknown backend {backend!r}", fix="use auto, gloo or nccl")
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
