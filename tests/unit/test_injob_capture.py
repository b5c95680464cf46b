"""The in-job save's parts that need no job: engine checks, the snapshot, live tensors behind the
FileTensor interface, and a MemoryInput's files classified like a saved folder's."""
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from uckpt.conversion.comm import Comm
from uckpt.conversion.inputs import MemoryInput, as_file_tensors
from uckpt.dsformat.files import Family
from uckpt.errors import UnsupportedEngineError
from uckpt.injob.capture import check_engine, snapshot
from uckpt.torchsave.reader import FileTensor


def _engine(nvme=False, optimizer=torch.optim.Adam, zero=True):
    base = optimizer([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    return SimpleNamespace(save_checkpoint=None, optimizer=SimpleNamespace(optimizer=base),
                           zero_nvme_offload_optimizer=lambda: nvme, zero_optimization=lambda: zero,
                           bfloat16_enabled=lambda: False)


def test_engine_checks_name_the_cause():
    check_engine(_engine())
    with pytest.raises(UnsupportedEngineError, match="NVMe optimizer offload"):
        check_engine(_engine(nvme=True))
    with pytest.raises(UnsupportedEngineError, match="the optimizer is SGD"):
        check_engine(_engine(optimizer=torch.optim.SGD))
    with pytest.raises(UnsupportedEngineError, match="no ZeRO optimizer"):
        check_engine(_engine(zero=False))


def test_snapshot_is_independent_of_later_steps_and_copies_shared_tensors_once():
    shared = torch.arange(6, dtype=torch.float32)
    param = torch.nn.Parameter(torch.ones(3))
    files = {"a.pt": {"x": shared, "p": param, "nested": [shared, (1, "s")], "od": OrderedDict(k=shared)}}
    snap, used = snapshot(files)
    assert len(used) == 2  # the shared tensor once, the parameter once
    with torch.no_grad():
        shared.add_(100)
        param.mul_(0)
    out = snap["a.pt"]
    assert torch.equal(out["x"], torch.arange(6, dtype=torch.float32)) and torch.equal(out["p"], torch.ones(3))
    assert isinstance(out["p"], torch.nn.Parameter) and type(out["od"]) is OrderedDict
    assert out["x"] is out["nested"][0] is out["od"]["k"] and out["nested"][1] == (1, "s")


def test_live_tensors_read_like_file_tensors():
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    ft = FileTensor.in_memory(t, "<memory>/x.pt")
    assert ft.shape == (3, 4) and ft.dtype == "float32" and ft.numel() == 12 and ft.nbytes == 48
    buf = bytearray(4 * 5)
    ft.read_into(memoryview(buf), 3)
    assert torch.equal(torch.frombuffer(buf, dtype=torch.float32), torch.arange(3, 8, dtype=torch.float32))
    view = as_file_tensors({"g": [t], "s": torch.Size([3, 4])}, "<memory>/x.pt")
    assert isinstance(view["g"][0], FileTensor) and view["s"] == (3, 4)


def test_memory_input_classifies_names_like_a_folder():
    zero = {"optimizer_state_dict": {}}
    held = {"zero_pp_rank_0_mp_rank_00_optim_states.pt": zero, "zero_pp_rank_1_mp_rank_00_optim_states.pt": zero,
            "mp_rank_00_model_states.pt": {"module": {}}}
    inp = MemoryInput("/ckpts/global_step3_universal", held)
    files = inp.files(Comm())
    assert files.family is Family.ZERO12 and [s.kind.value for s in files.sources] == ["model", "optim", "optim"]
    assert inp.readers(files, Comm()) == [0, 0, 0] and inp.resume_key() is None


def test_snapshot_buffers_are_reused_only_once_released():
    from uckpt.injob.capture import HostBuffers

    buffers = HostBuffers()
    t = torch.arange(4, dtype=torch.float32)
    _, first = snapshot({"a.pt": {"x": t}}, buffers)
    _, second = snapshot({"a.pt": {"x": t}}, buffers)
    assert first[0].data_ptr() != second[0].data_ptr()  # the first is still in use
    buffers.release(first)
    out, third = snapshot({"a.pt": {"x": t + 1}}, buffers)
    assert third[0].data_ptr() == first[0].data_ptr() and torch.equal(out["a.pt"]["x"], t + 1)
