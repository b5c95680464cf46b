"""The codec's reader runs no code a file names: only plain containers and torch's tensor rebuilds are
resolved, everything else is an inert stand-in; declared sizes and byte order are checked first."""
import collections
import enum
import os

import pytest
import torch

from uckpt.torchsave import format as F
from uckpt.torchsave import reader, writer


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Builtin:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # a global of the standard library that the old reader resolved for real
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


def test_no_global_outside_the_allow_list_is_called(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "f.pt"
    torch.save({"w": torch.arange(4.0), "a": Payload(marker), "b": Builtin(marker),
                "od": collections.OrderedDict(x=1), "s": {1, 2}}, path)
    seen = set()
    obj = reader.open_lazy(str(path), seen)
    assert not marker.exists()
    assert isinstance(obj["a"], F.Stub) and isinstance(obj["b"], F.Stub)
    assert seen == {"posix.system", "builtins.eval"}
    assert isinstance(obj["od"], collections.OrderedDict) and obj["od"] == {"x": 1} and obj["s"] == {1, 2}
    assert torch.equal(obj["w"].load(), torch.arange(4.0))
    # written back, the stand-in is the same pickle: the file round-trips, inert
    out = tmp_path / "g.pt"
    writer.save(obj, str(out))
    assert isinstance(reader.open_lazy(str(out))["a"], F.Stub) and not marker.exists()


def test_legacy_files_are_loaded_with_weights_only(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "legacy.pt"
    torch.save({"a": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(F.FormatError, match="refuses to load safely"):
        reader.open_lazy(str(path))
    assert not marker.exists()
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(reader.open_lazy(str(path))["w"].load(), torch.ones(3))


def test_declared_shape_larger_than_its_storage_is_refused(tmp_path):
    path = tmp_path / "f.pt"
    writer.save({"w": F.TensorData("float32", (32_000_000,), bytearray(16))}, str(path))
    with pytest.raises(F.FormatError, match="storage record holds"):
        reader.open_lazy(str(path))


def test_big_endian_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "f.pt"
    monkeypatch.setattr(F, "BYTEORDER", ("byteorder", b"big"))
    writer.save({"w": F.TensorData("float32", (1,), bytearray(4))}, str(path))
    monkeypatch.undo()
    with pytest.raises(F.FormatError, match="big-endian"):
        reader.open_lazy(str(path))


class Stage(enum.IntEnum):
    two = 2


class Scaler:
    def __init__(self):
        self.cur_scale = 1.0


def test_materialize_rebuilds_only_allowed_classes(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"stage": Stage.two, "scaler": Scaler(), "other": Scaler()}, path)
    obj = reader.open_lazy(str(path))
    name = f"{__name__}."
    real = F.materialize({k: obj[k] for k in ("stage", "scaler")}, {name + "Stage": Stage, name + "Scaler": Scaler})
    assert real["stage"] is Stage.two and isinstance(real["scaler"], Scaler) and real["scaler"].cur_scale == 1.0
    assert isinstance(F.materialize(obj["other"], {name + "Stage": Stage}), F.Stub)


def _zip(path, pkl: bytes, records=()):
    """A torch.save-shaped zip holding ``pkl`` as its pickle (crafted inputs the pickler cannot make)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        for name, data in records:
            zf.writestr(f"archive/data/{name}", data)
    return str(path)


class Relocate:
    """A tensor whose pickle then moves it (BUILD) to another file and a larger shape."""

    def __reduce__(self):
        t = torch.zeros(1)
        return (torch._utils._rebuild_tensor_v2, (t.storage(), 0, (1,), (1,), False, collections.OrderedDict()),
                {"path": "/proc/self/environ", "shape": (256,), "storage_nbytes": 256, "dtype": "uint8"})


def test_a_pickle_cannot_move_a_checked_tensor(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"t": Relocate()}, path)
    with pytest.raises(F.FormatError, match="sets state on a FileTensor"):
        reader.open_lazy(str(path))


def test_global_names_must_be_python_names(tmp_path):
    pkl = b"\x80\x04\x8c\x05posix\x8c\x14system\ncposix\nsystem\x93."  # STACK_GLOBAL of a name holding a newline
    with pytest.raises(F.FormatError, match="not a Python name"):
        reader.open_lazy(_zip(tmp_path / "f.pt", pkl))


def test_no_allocation_the_file_does_not_back(tmp_path):
    bomb = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R."  # bytearray(1 GiB)
    with pytest.raises(F.FormatError, match="bytearray"):
        reader.open_lazy(_zip(tmp_path / "a.pt", bomb))
    path = tmp_path / "b.pt"  # 10**9 elements over a 4-byte storage through a zero stride
    writer.save({"w": F.TensorData("float32", (10 ** 9,), bytearray(4), stride=(0,))}, str(path))
    with pytest.raises(F.FormatError, match="storage record holds"):
        reader.open_lazy(str(path))


def test_shared_objects_cannot_explode(tmp_path):
    x = [1]
    for _ in range(30):
        x = [x, x]  # 2**30 leaves when written back, from a pickle of a few hundred bytes
    path = tmp_path / "f.pt"
    torch.save({"x": x}, path)
    with pytest.raises(F.FormatError, match="shares objects"):
        reader.open_lazy(str(path))


def test_materialize_gives_no_state_to_enum_members_or_dunders(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"stage": Stage.two}, path)
    stub = reader.open_lazy(str(path))["stage"]
    object.__setattr__(stub, "_state", {"_value_": 3})  # as a crafted BUILD would give it
    with pytest.raises(F.FormatError, match="state uckpt does not accept"):
        F.materialize(stub, {f"{__name__}.Stage": Stage})
    assert Stage.two.value == 2
    torch.save({"scaler": Scaler()}, path)
    stub = reader.open_lazy(str(path))["scaler"]
    object.__setattr__(stub, "_state", {"__class__": Stage})
    with pytest.raises(F.FormatError):
        F.materialize(stub, {f"{__name__}.Scaler": Scaler})
