"""The ``torch.save`` file format as plain data, so the converter can read and write it without torch.

A conversion of a dense ZeRO checkpoint moves bytes: fp32 fragments out of optimizer shards,
concatenated in order, into fp32 state files. Importing torch costs about 2 s on a small machine,
more than the rest of a conversion of hundreds of MB takes, so the one-process converter reads
and writes these files itself (:mod:`uckpt.ranged` reads, :mod:`uckpt.tsave` writes) and imports
torch only where arithmetic or collectives need it (tensor-parallel merges, several ranks).

This module holds what both sides share: the dtype table (torch's legacy storage classes,
which ``torch.save`` still names in its pickles), :class:`TensorData` (a tensor held as bytes),
and the stand-ins the reader puts where a pickle names a class that is not imported here
(DeepSpeed's ``LossScaler``, ``ZeroStageEnum``, ``fragment_address``, ``torch.Size``...). A stand-in
records how it was built, so the writer pickles it back to the same class: DeepSpeed and torch
load the written file exactly as they load one written by ``torch.save``.
"""
import collections
import enum
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


# dtype name -> (bytes per element, torch's legacy storage class that torch.save pickles,
#                 struct format of one element, None where struct has none)
DTYPES: Dict[str, Tuple[int, str, Optional[str]]] = {
    "float32": (4, "FloatStorage", "f"),
    "float64": (8, "DoubleStorage", "d"),
    "float16": (2, "HalfStorage", "e"),
    "bfloat16": (2, "BFloat16Storage", None),
    "int64": (8, "LongStorage", "q"),
    "int32": (4, "IntStorage", "i"),
    "int16": (2, "ShortStorage", "h"),
    "int8": (1, "CharStorage", "b"),
    "uint8": (1, "ByteStorage", "B"),
    "bool": (1, "BoolStorage", "?"),
    "complex64": (8, "ComplexFloatStorage", None),
    "complex128": (16, "ComplexDoubleStorage", None),
}
STORAGE_DTYPES = {storage: name for name, (_, storage, _) in DTYPES.items()}

# record names inside the zip (torch/csrc/jit/serialization and torch/serialization.py)
DATA_PKL = "data.pkl"
DATA_PREFIX = "data/"
FORMAT_VERSION = (".format_version", b"1")
STORAGE_ALIGNMENT = (".storage_alignment", b"64")
BYTEORDER = ("byteorder", b"little")
VERSION = ("version", b"3\n")
SERIALIZATION_ID = ".data/serialization_id"
ALIGNMENT = 64  # torch aligns every record's data to 64 bytes (so files can be memory-mapped)
PICKLE_PROTOCOL = 2  # torch.save's default


class FormatError(ValueError):
    """A file that is not a well-formed ``torch.save`` file uckpt can read safely."""


def shape_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def strided_runs(shape, layouts):
    """Walk a block of ``shape`` laid out in several tensors at once: ``layouts`` holds each one's
    (element offset, strides). Yields, per run of elements contiguous in every layout, each layout's
    offset of the run, then the run's length (the trailing dimensions all layouts pack densely)."""
    shape = tuple(int(d) for d in shape)
    if not shape_numel(shape):
        return
    run, k = 1, len(shape)
    while k > 0 and (shape[k - 1] == 1 or all(strides[k - 1] == run for _, strides in layouts)):
        run *= shape[k - 1]
        k -= 1
    idx = [0] * k
    while True:
        yield tuple(off + sum(i * s for i, s in zip(idx, strides)) for off, strides in layouts) + (run,)
        a = k - 1
        while a >= 0:
            idx[a] += 1
            if idx[a] < shape[a]:
                break
            idx[a] = 0
            a -= 1
        if a < 0:
            return


def itemsize(dtype: str) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not one uckpt reads or writes without torch")
    return DTYPES[dtype][0]


def row_major_strides(shape) -> Tuple[int, ...]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= int(dim)
    return tuple(reversed(strides))


def torch_dtype(name: str):
    import torch
    return getattr(torch, name)


def dtype_name(torch_dtype_obj) -> str:
    return str(torch_dtype_obj).replace("torch.", "")


@dataclass
class TensorData:
    """A tensor held as bytes in memory: ``data`` is its whole storage (row-major unless ``stride``)."""

    dtype: str
    shape: Tuple[int, ...]
    data: Any  # bytes-like: bytes, bytearray or memoryview
    stride: Optional[Tuple[int, ...]] = None
    storage_offset: int = 0
    requires_grad: bool = False

    def numel(self) -> int:
        return shape_numel(self.shape)

    def item(self):
        """The value of a one-element tensor (a step), as a Python number."""
        if self.numel() != 1:
            raise ValueError(f"item() of a tensor of {self.numel()} elements")
        size = itemsize(self.dtype)
        raw = bytes(memoryview(self.data).cast("B")[self.storage_offset * size:(self.storage_offset + 1) * size])
        if self.dtype == "bfloat16":
            return struct.unpack("<f", b"\x00\x00" + raw)[0]
        return struct.unpack("<" + DTYPES[self.dtype][2], raw)[0]

    def to_torch(self):
        """A torch tensor with these values (its own memory)."""
        import torch
        nbytes = len(memoryview(self.data).cast("B"))
        flat = torch.empty(nbytes // itemsize(self.dtype), dtype=torch_dtype(self.dtype))
        if nbytes:
            flat.view(torch.uint8).numpy()[:] = memoryview(self.data).cast("B")
        stride = self.stride if self.stride is not None else row_major_strides(self.shape)
        return torch.as_strided(flat, self.shape, stride, self.storage_offset)

    def __eq__(self, other):
        if not isinstance(other, TensorData):
            return NotImplemented
        return (self.dtype, tuple(self.shape), self.stride, self.storage_offset) == \
            (other.dtype, tuple(other.shape), other.stride, other.storage_offset) and \
            bytes(memoryview(self.data).cast("B")) == bytes(memoryview(other.data).cast("B"))

    def __reduce__(self):  # memoryviews do not pickle: ranks exchange steps as bytes
        return (TensorData, (self.dtype, tuple(self.shape), bytes(memoryview(self.data).cast("B")), self.stride,
                             self.storage_offset, self.requires_grad))


def _no_state(self, state):
    """Objects the reader builds itself take no state from a pickle (a ``BUILD`` opcode would otherwise
    overwrite their fields after they were checked)."""
    raise FormatError(f"the pickle sets state on a {type(self).__name__}, which torch.save never does")


class TorchSize(tuple):
    """``torch.Size`` read without torch; written back as ``torch.Size``."""

    __setstate__ = _no_state

    def __repr__(self):
        return f"torch.Size({list(self)})"


class OrderedDict(collections.OrderedDict):
    """``collections.OrderedDict`` as the reader builds it: the only state a pickle may give it is a
    module state dict's ``_metadata`` (its other attributes would shadow the dict's methods)."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or set(state) - {"_metadata"}:
            raise FormatError("the pickle sets attributes other than _metadata on an OrderedDict")
        self._metadata = state.get("_metadata")

    def __reduce__(self):  # ranks exchange metadata holding these: a plain OrderedDict on the other side
        return (collections.OrderedDict, (list(self.items()),))


OrderedDict.__module__ = "collections"  # pickled back, and printed, as the class it stands for


def is_identifier_path(text) -> bool:
    """``a.b.c`` of Python identifiers: what a pickle's global names must be (a newline in one would
    inject opcodes when the name is written back)."""
    return isinstance(text, str) and all(part.isidentifier() for part in text.split("."))


class Stub:
    """An object of a class that is not imported here, as the pickle built it.

    ``REDUCE`` calls the class (``__init__`` runs: ``_called``), ``NEWOBJ`` only ``__new__``; ``BUILD``
    hands over the state. Attributes read through to a dict state; ``int()`` gives the single
    argument of an int enum (``ZeroStageEnum(2)``)."""

    _module = ""
    _qualname = ""

    def __new__(cls, *args):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_called", False)
        object.__setattr__(obj, "_state", None)
        return obj

    def __init__(self, *args):
        object.__setattr__(self, "_called", True)

    def __setstate__(self, state):
        object.__setattr__(self, "_state", state)

    def __getattr__(self, name):
        state = object.__getattribute__(self, "_state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = dict(state[0] or {}, **state[1])  # (dict, slots) state
        if isinstance(state, dict) and name in state:
            return state[name]
        raise AttributeError(f"{type(self)._module}.{type(self)._qualname} read without its class has no {name!r}")

    def __int__(self):
        args = object.__getattribute__(self, "_args")
        if len(args) == 1 and isinstance(args[0], int):
            return int(args[0])
        raise TypeError(f"{type(self)._qualname} is not an int enum")

    __index__ = __int__

    def __eq__(self, other):
        return type(self) is type(other) and (self._args, self._called, self._state) == \
            (other._args, other._called, other._state)

    def __hash__(self):
        return hash((type(self)._module, type(self)._qualname, self._args))

    def __repr__(self):
        return f"<{type(self)._module}.{type(self)._qualname} {self._args or ''}{self._state or ''}>"

    def __reduce__(self):  # ranks may exchange metadata holding stand-ins
        return (_rebuild_stub, (type(self)._module, type(self)._qualname, self._args, self._called, self._state))


_STUB_CLASSES: Dict[Tuple[str, str], type] = {}


def stub_class(module: str, qualname: str) -> type:
    """One stand-in class per (module, name), so equal globals stay identical objects."""
    key = (module, qualname)
    if key not in _STUB_CLASSES:
        _STUB_CLASSES[key] = type(qualname.rsplit(".", 1)[-1], (Stub,), {"_module": module, "_qualname": qualname})
    return _STUB_CLASSES[key]


def _rebuild_stub(module, qualname, args, called, state):
    obj = stub_class(module, qualname).__new__(stub_class(module, qualname), *args)
    object.__setattr__(obj, "_called", called)
    object.__setattr__(obj, "_state", state)
    return obj


def materialize(obj: Any, classes: Dict[str, type], _memo: Optional[Dict[int, Any]] = None) -> Any:
    """``obj`` with the stand-ins of the allow-listed ``classes`` (``"module.qualname"`` -> class) rebuilt
    as real objects, the way a safe unpickler rebuilds an allow-listed global: the class called with
    the recorded arguments (``REDUCE``: enums, named tuples) or created bare (``NEWOBJ``), then given
    its recorded state: plain attributes only (no ``__dunder__`` names, none on an enum member, which
    is shared by the whole process). Other stand-ins stay inert; containers are rebuilt around what
    changed, each shared object once."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, Stub):
        cls = classes.get(f"{type(obj)._module}.{type(obj)._qualname}")
        if cls is None:
            return obj
        args = tuple(materialize(a, classes, memo) for a in obj._args)
        real = cls(*args) if obj._called else cls.__new__(cls, *args)
        state = materialize(obj._state, classes, memo)
        if state is not None:
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            attrs = dict(state or {}, **(slots or {}))
            if isinstance(real, enum.Enum) or not all(isinstance(k, str) and not k.startswith("__") for k in attrs):
                raise FormatError(f"the pickle gives a {type(obj)._qualname} state uckpt does not accept")
            for k, v in attrs.items():
                object.__setattr__(real, k, v) if type(real).__setattr__ is object.__setattr__ \
                    else real.__dict__.__setitem__(k, v)
        memo[id(obj)] = real
        return real
    if isinstance(obj, dict) and type(obj) in (dict, collections.OrderedDict, OrderedDict):
        out = type(obj)()
        memo[id(obj)] = out
        out.update((k, materialize(v, classes, memo)) for k, v in obj.items())
        return out
    if type(obj) in (list, tuple):
        out = type(obj)(materialize(v, classes, memo) for v in obj)
        memo[id(obj)] = out
        return out
    return obj


def is_stub_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, Stub) and obj is not Stub


def torch_loaded() -> bool:
    """Whether this process already paid for torch (then handing torch objects around costs nothing)."""
    return "torch" in sys.modules


def map_leaves(obj: Any, leaf) -> Any:
    """``obj`` with ``leaf(x)`` in place of every value that is not a dict, list or tuple, the containers
    rebuilt with their own type (a dict subclass that cannot be built from items becomes a dict)."""
    if isinstance(obj, dict):
        items = [(k, map_leaves(v, leaf)) for k, v in obj.items()]
        try:
            return type(obj)(items)
        except TypeError:
            return dict(items)
    if type(obj) in (list, tuple):
        return type(obj)(map_leaves(v, leaf) for v in obj)
    return leaf(obj)


def is_torch_tensor(obj) -> bool:
    """``torch.is_tensor(obj)``, without importing torch where it is not loaded (then nothing is a tensor)."""
    if not torch_loaded():
        return False
    import torch
    return torch.is_tensor(obj)


def as_fp32_tensor(buf):
    """The fp32 torch tensor over ``buf``'s memory (no copy)."""
    import torch
    if not len(buf):
        return torch.empty(0, dtype=torch.float32)
    return torch.frombuffer(buf, dtype=torch.float32)
