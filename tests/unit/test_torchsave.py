"""The torch-free writer of the ``torch.save`` format: what it writes loads with ``torch.load`` (also
memory-mapped) into the objects ``torch.save`` would have written, zip64 records included; bf16 and
other dtypes widen to fp32 exactly as ``tensor.float()``."""
import collections
import os
import zipfile

import pytest
import torch

from uckpt.torchsave import reader as ranged
from uckpt.torchsave import writer as tsave
from uckpt.torchsave import format as F
from uckpt.conversion.payloads import to_fp32
from helpers.checks import same, tensor_data


def test_writer_round_trip_through_torch_load(tmp_path):
    base = torch.randn(4, 6)
    objects = {
        "param": tensor_data(base), "cat_dim": 1, "vocab_tensor": True, "neg": -70000, "big": 2**70, "f": 0.1,
        "text": "ünïcode", "none": None, "blob": b"\x00\xff", "nested": [1, (2, 3), (4, 5, 6, 7), {"k": [None]}],
        "od": collections.OrderedDict([("b", 1), ("a", 2)]), "size": F.TorchSize((3, 4)),
        "scalar": tensor_data(torch.tensor(7.0)), "empty": tensor_data(torch.zeros(0, 5)),
        "bf16": tensor_data(torch.arange(10, dtype=torch.bfloat16)), "i64": tensor_data(torch.arange(5)),
        "strided": F.TensorData("float32", (2, 3), bytearray(base.numpy().tobytes()), stride=(1, 2), storage_offset=5),
        "torch": torch.arange(6, dtype=torch.float16).view(2, 3)[:, 1:],
    }
    expected = {k: (v.to_torch() if isinstance(v, F.TensorData) else v) for k, v in objects.items()}
    expected["size"] = torch.Size((3, 4))
    path = str(tmp_path / "x.pt")
    size = tsave.save(objects, path)
    assert size == os.path.getsize(path)
    for mmap in (False, True):
        got = torch.load(path, weights_only=False, mmap=mmap)
        same(got, expected)
        assert type(got["od"]) is collections.OrderedDict and type(got["size"]) is torch.Size
        assert got["strided"].stride() == (1, 2) and got["strided"].storage_offset() == 5
    zf = zipfile.ZipFile(path)
    assert zf.testzip() is None  # every CRC is right
    for info in zf.infolist():  # records start at multiples of 64, as torch writes them (mmap loads need it)
        if "/data/" in info.filename:
            with open(path, "rb") as f:
                f.seek(info.header_offset + 26)
                name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0
    # and the lazy reader reads it back: FileTensors at the right bytes
    lazy = ranged.open_lazy(path)
    assert torch.equal(lazy["param"].load(), base) and torch.equal(lazy["strided"].load(), expected["strided"])


def test_writer_zip64_records(tmp_path, monkeypatch):
    """Sizes and offsets past 4 GiB take zip64 fields; the limit is lowered so that a small file needs them."""
    monkeypatch.setattr(tsave, "_ZIP64_AT", 100)
    t = torch.randn(64)
    path = str(tmp_path / "z.pt")
    tsave.save({"param": tensor_data(t), "other": tensor_data(torch.ones(3))}, path)
    zf = zipfile.ZipFile(path)
    assert zf.testzip() is None
    assert any(i.file_size >= 100 and i.extra[:2] == b"\x01\x00" for i in zf.infolist())
    got = torch.load(path, weights_only=False)
    assert torch.equal(got["param"], t) and torch.equal(got["other"], torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool])
def test_to_fp32_matches_torch_float(dtype):
    values = (torch.randn(257) * 1000).to(dtype)
    assert torch.equal(to_fp32(tensor_data(values)).to_torch(), values.float())
