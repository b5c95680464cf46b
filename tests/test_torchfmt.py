"""The torch-free reader and writer of the ``torch.save`` format (uckpt.ranged, uckpt.tsave).

What the writer produces must load with ``torch.load`` (also memory-mapped) into the objects
``torch.save`` would have written, with valid zip CRCs and 64-byte aligned records; what the reader
gives with stand-ins must write back to the same objects, DeepSpeed's classes included.
"""
import collections
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from uckpt.torchsave import reader as ranged
from uckpt.torchsave import writer as tsave
from uckpt.torchsave import format as F
from uckpt.tools.compare import _diff
from examples import runner
from uckpt.conversion.payloads import to_fp32


def _data(t: torch.Tensor) -> F.TensorData:
    t = t.contiguous()
    return F.TensorData(F.dtype_name(t.dtype), tuple(t.shape), bytearray(t.view(-1).view(torch.uint8).numpy().tobytes())
                        if t.numel() else bytearray())


def _same(a, b):
    out = []
    _diff(a, b, "x", out)
    assert out == []


def test_writer_round_trip_through_torch_load(tmp_path):
    base = torch.randn(4, 6)
    objects = {
        "param": _data(base), "cat_dim": 1, "vocab_tensor": True, "neg": -70000, "big": 2**70, "f": 0.1,
        "text": "ünïcode", "none": None, "blob": b"\x00\xff", "nested": [1, (2, 3), (4, 5, 6, 7), {"k": [None]}],
        "od": collections.OrderedDict([("b", 1), ("a", 2)]), "size": F.TorchSize((3, 4)),
        "scalar": _data(torch.tensor(7.0)), "empty": _data(torch.zeros(0, 5)),
        "bf16": _data(torch.arange(10, dtype=torch.bfloat16)), "i64": _data(torch.arange(5)),
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
        _same(got, expected)
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
    tsave.save({"param": _data(t), "other": _data(torch.ones(3))}, path)
    zf = zipfile.ZipFile(path)
    assert zf.testzip() is None
    assert any(i.file_size >= 100 and i.extra[:2] == b"\x01\x00" for i in zf.infolist())
    got = torch.load(path, weights_only=False)
    assert torch.equal(got["param"], t) and torch.equal(got["other"], torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool])
def test_to_fp32_matches_torch_float(dtype):
    values = (torch.randn(257) * 1000).to(dtype)
    assert torch.equal(to_fp32(_data(values)).to_torch(), values.float())


def test_stand_ins_write_back_deepspeed_objects(store, tmp_path):
    """A real optimizer shard read without DeepSpeed's classes and written again equals the original."""
    tag = store.tag("z2-bf16-dp4")
    for name in ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        src = os.path.join(tag, name)
        lazy = ranged.open_lazy(src, stand_ins=True)
        if "optimizer_state_dict" in lazy:
            osd = lazy["optimizer_state_dict"]
            assert isinstance(osd["loss_scaler"], F.Stub) and int(osd["zero_stage"]) == 2
            mapping = next(iter(osd["param_slice_mappings"][0].values()))
            assert mapping.numel > 0 and mapping.start >= 0
        out = str(tmp_path / name)
        tsave.save(lazy, out)
        _same(torch.load(out, weights_only=False), torch.load(src, weights_only=False))


def test_one_process_conversion_imports_no_torch(store, tmp_path):
    """The point of the torch-free path: a dense one-process conversion loads neither torch nor
    DeepSpeed's runtime (each costs seconds at start-up)."""
    out = str(tmp_path / "u" / "universal")
    code = ("import sys; from uckpt.tools.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('torch', 'deepspeed') if m in sys.modules]; "
            "print('IMPORTED', bad); sys.exit(rc or bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code, "convert", "--input_folder", store.tag("z2-bf16-dp4"),
                           "--output_folder", out, "--inject_missing_state", "--quiet"],
                          cwd=runner.REPO, env=runner.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IMPORTED []" in proc.stdout
    skip = lambda rel: rel == os.path.join("zero", "head.weight", "fp32.pt")  # noqa: E731  (README: tied alias)
    from uckpt.tools.compare import compare_universal
    assert compare_universal(out, store.ds_universal("z2-bf16-dp4"), skip=skip) == []
