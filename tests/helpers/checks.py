"""Checks shared by the tests: states of resumed engines, tensors held as bytes, O_DIRECT support."""
import errno
import mmap
import os

import torch

from uckpt.tools.compare import _diff, load_state
from uckpt.torchsave import direct as directio
from uckpt.torchsave import format as F


def assert_same_state(a, b):
    assert a["global_steps"] == b["global_steps"]
    assert a["step"] == b["step"] and len(a["step"]) > 0
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert a[key].keys() == b[key].keys() and len(a[key]) > 0
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def universal_value(universal, name, state):
    value = load_state(universal, name, state)
    return value["param"] if isinstance(value, dict) else value


def tensor_data(t: torch.Tensor) -> F.TensorData:
    t = t.contiguous()
    return F.TensorData(F.dtype_name(t.dtype), tuple(t.shape), bytearray(t.view(-1).view(torch.uint8).numpy().tobytes())
                        if t.numel() else bytearray())


def same(a, b):
    out = []
    _diff(a, b, "x", out)
    assert out == []


def direct_supported(folder) -> bool:
    path = os.path.join(folder, "probe")
    buf = mmap.mmap(-1, directio.DIRECT_ALIGN)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    try:
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.remove(path)


def partial_folders(out) -> list:
    """The partial folders a conversion to ``out`` left (any run's: ``<out>.uckpt-partial-<run id>``)."""
    import glob

    return glob.glob(glob.escape(str(out) + ".uckpt-partial") + "*")
