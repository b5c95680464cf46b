"""Read ``torch.save`` files without torch: metadata from the pickle, tensor bytes by range.

A ``torch.save`` file is an uncompressed zip: a small pickle plus one record per storage. This
module unpickles the pickle with every tensor replaced by a :class:`FileTensor` (where its bytes
are in the file, dtype, shape, strides) and every class or function outside a short allow-list
replaced by an inert :mod:`uckpt.torchsave.format` stand-in (no code from a file ever runs), then reads element ranges with ``os.preadv`` straight into the
caller's buffer. A rank therefore reads the pickle and the bytes it keeps, nothing else, and the
count is exact: :data:`uckpt.torchsave.stats.IO` adds up every byte requested from the file system.

Torch is imported only by the helpers that return torch tensors (the loader's), and as the
fallback for files this reader does not know (the legacy format, unknown rebuild functions),
whose values ``torch.load(weights_only=True)`` gives; the byte count then covers whole pages.
"""
import _compat_pickle
import codecs
import io
import os
import pickle
import threading
import zipfile
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from . import format as F
from .format import row_major_strides, shape_numel
from .stats import IO
from .zipfmt import Unsupported, legacy, pread_into, records



class FileDescriptors:
    """Open files by path, each opened once and kept until :meth:`close` (a converter reads many
    fragments of the same few shards)."""

    def __init__(self):
        self._fds: Dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass
class FileTensor:
    """A tensor that still lives in its file: ``data_offset`` is the byte where its storage begins.

    ``dtype`` is the dtype's name (``"float32"``); ``storage_nbytes`` the size of the whole storage
    record, which the writer copies when the tensor is saved again."""

    path: str
    data_offset: int
    dtype: str
    storage_offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    requires_grad: bool = False
    storage_nbytes: int = 0
    is_parameter: bool = False
    _loaded: Any = None  # fallback: a real (memory-mapped) torch tensor

    __setstate__ = F._no_state  # a pickle's BUILD may not rewrite a checked tensor's place in the file

    def __reduce__(self):  # pickled by its fields (ranks exchange metadata), never through __setstate__
        return (FileTensor, tuple(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def in_memory(cls, tensor, path: str) -> "FileTensor":
        """A live torch tensor behind the same interface, named ``path`` in messages: what an in-job save
        hands the index and the exchange in place of a tensor still in its file (reads copy from it,
        from the GPU in the slices asked for)."""
        return cls(path, 0, F.dtype_name(tensor.dtype), 0, tuple(tensor.shape), tuple(tensor.stride()),
                   bool(tensor.requires_grad), tensor.untyped_storage().nbytes(),
                   type(tensor).__name__ == "Parameter", tensor)

    def numel(self) -> int:
        return shape_numel(self.shape)

    def element_size(self) -> int:
        return F.itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()

    @property
    def contiguous(self) -> bool:
        return all(s == r for s, r, d in zip(self.stride, row_major_strides(self.shape), self.shape) if d > 1)

    @property
    def torch_dtype(self):
        return F.torch_dtype(self.dtype)

    def read_into(self, view: memoryview, start: int = 0, fds: "FileDescriptors" = None):
        """Elements ``[start, start + n)`` of the flattened tensor into ``view`` (``n`` = its size in elements)."""
        size = self.element_size()
        view = view.cast("B") if view.format != "B" else view
        n = len(view) // size
        if start < 0 or start + n > self.numel():
            raise ValueError(f"elements [{start}, {start + n}) are outside a tensor of {self.numel()}")
        if self._loaded is not None or not self.contiguous:
            import torch
            part = self.load().detach().reshape(-1)[start:start + n].contiguous()
            if part.device.type != "cpu":
                part = part.cpu()
            view[:] = memoryview(part.view(torch.uint8).numpy()) if n else b""
            return
        offset = self.data_offset + (self.storage_offset + start) * size
        if fds is not None:
            pread_into(fds.get(self.path), view, offset)
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pread_into(fd, view, offset)
        finally:
            os.close(fd)

    def to_data(self) -> F.TensorData:
        """The tensor's values in memory (contiguous, its own storage)."""
        buf = bytearray(self.nbytes)
        self.read_into(memoryview(buf))
        return F.TensorData(self.dtype, tuple(self.shape), buf, requires_grad=self.requires_grad)

    def read_strided(self, offset: int, shape: Sequence[int], strides: Sequence[int], out=None):
        """Elements ``as_strided(flat, shape, strides, offset)`` of this tensor viewed as a flat
        row-major buffer, read with one ``pread`` per contiguous run (a torch tensor); into ``out``
        (a contiguous CPU tensor of this dtype and that shape) where given, with no copy."""
        import torch
        shape, strides = tuple(int(d) for d in shape), tuple(int(s) for s in strides)
        if self._loaded is not None or not self.contiguous:
            flat = self.load().reshape(-1)
            got = torch.as_strided(flat, shape, strides, offset)
            return out.copy_(got.reshape(out.shape)) if out is not None else got.clone()
        numel = shape_numel(shape)
        if out is not None:
            if not out.is_contiguous() or out.numel() != numel or out.dtype != self.torch_dtype:
                raise ValueError("read_strided: out must be a contiguous tensor of the tensor's dtype and shape")
            result, out = out, out.view(-1)
        else:
            result, out = None, torch.empty(numel, dtype=self.torch_dtype)
        if numel == 0:
            return out.view(shape)
        # one run per leading index of the trailing dimensions the file packs densely (the output is contiguous)
        runs = list(F.strided_runs(shape, [(offset, strides), (0, row_major_strides(shape))]))
        starts: List[int] = [src for src, _, _ in runs]
        run = runs[0][2]
        size = self.element_size()
        base = self.data_offset + self.storage_offset * size
        buf = memoryview(out.view(torch.uint8).numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pos, i = 0, 0
            while i < len(starts):  # coalesce runs that follow each other in the file
                j = i + 1
                while j < len(starts) and starts[j] == starts[j - 1] + run:
                    j += 1
                nbytes = (j - i) * run * size
                pread_into(fd, buf[pos:pos + nbytes], base + starts[i] * size)
                pos += nbytes
                i = j
        finally:
            os.close(fd)
        return result if result is not None else out.view(shape)

    def load(self):
        """The whole tensor as a torch tensor (reads all of its bytes)."""
        import torch
        if self._loaded is not None:
            return self._loaded
        extent = 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride)) if self.numel() else 0
        flat = FileTensor(self.path, self.data_offset, self.dtype, self.storage_offset, (extent,), (1,))
        return torch.as_strided(flat.read_strided(0, (extent,), (1,)), self.shape, self.stride, 0)


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


# Globals resolved for real: plain containers and functions that build nothing but data. Every other
# global of a pickle becomes an inert stand-in (uckpt.torchsave.format.Stub): it records how the
# pickle built it and is never called, so no code from a checkpoint ever runs.
def _bytearray(*args):
    """``bytearray`` as pickles build it (from a string and an encoding, or bytes): never ``bytearray(n)``,
    which would allocate whatever a file asks for."""
    if args and not isinstance(args[0], (str, bytes, bytearray)):
        raise F.FormatError("the pickle builds a bytearray from something other than its bytes")
    return bytearray(*args)


_REAL_GLOBALS = {
    ("collections", "OrderedDict"): F.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): codecs.encode,  # protocol 2 pickles bytes as encode(str, "latin1")
}
MAX_EXPANSION = 64  # objects written back per object read: far above any real checkpoint's sharing
# Stand-ins that DeepSpeed checkpoints hold by design: the report names every other one.
EXPECTED_STAND_INS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.checkpoint.universal_checkpoint.SubparamShape", "torch.Tensor", "torch.nn.parameter.Parameter",
})


def open_lazy(path: str, stand_ins: Optional[Set[str]] = None) -> Any:
    """The object saved in ``path`` with each tensor as a :class:`FileTensor` (no tensor bytes read).

    Safe on untrusted files: only the globals of ``_REAL_GLOBALS`` and torch's tensor rebuild
    functions are resolved; every other class or function named by the pickle becomes an inert
    stand-in, written back unchanged when the object is saved again (``stand_ins``, when given,
    collects their ``module.name``). Each tensor's shape, strides and offset are checked against its
    storage record before anything is read, and big-endian files are refused (:class:`FormatError`).
    Files this reader does not know (the legacy format, other rebuild functions) are read by
    ``torch.load`` with ``weights_only=True``."""
    try:
        return _open_zip(path, stand_ins)
    except Unsupported:
        import torch
        mmap = zipfile.is_zipfile(path)  # the legacy format cannot be memory-mapped
        try:
            loaded = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise F.FormatError(f"holds objects torch refuses to load safely ({str(exc).splitlines()[0][:200]})") \
                from None
        return _wrap_loaded(path, loaded)


def _check_extent(dtype: str, nbytes: int, storage_offset: int, size, stride):
    """The tensor fits in its storage record: checked before any allocation or read."""
    if dtype not in F.DTYPES:
        raise F.FormatError(f"a tensor has dtype {dtype}, which uckpt does not read")
    if not all(isinstance(d, int) and d >= 0 for d in size) or len(size) != len(stride) or \
            not all(isinstance(x, int) and x >= 0 for x in stride) or not isinstance(storage_offset, int) \
            or storage_offset < 0:
        raise F.FormatError(f"a tensor has an invalid shape {size}, strides {stride} or offset {storage_offset}")
    item = F.itemsize(dtype)
    if F.shape_numel(size) * item > nbytes or F.shape_numel(size) and \
            (storage_offset + 1 + sum((d - 1) * s for d, s in zip(size, stride))) * item > nbytes:
        raise F.FormatError(f"a tensor of shape {tuple(size)} at offset {storage_offset} needs more than the "
                            f"{nbytes} bytes its storage record holds")


def _open_zip(path: str, stand_ins: Optional[Set[str]]) -> Any:
    with open(path, "rb") as raw:
        try:
            zf = zipfile.ZipFile(raw)
        except zipfile.BadZipFile:
            if legacy(raw):
                raise Unsupported("legacy format") from None
            raise
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/" + F.DATA_PKL) or n == F.DATA_PKL), None)
        if pkl is None:
            raise Unsupported("no data.pkl")
        prefix = pkl[:-len(F.DATA_PKL)]
        order = prefix + F.BYTEORDER[0]
        if order in names and zf.read(order).strip() != F.BYTEORDER[1]:
            raise F.FormatError(f"was saved on a {zf.read(order).strip().decode(errors='replace')}-endian machine; "
                                "uckpt reads little-endian files only")
        spans = records(zf, raw)
        data = zf.read(pkl)
        IO.add(read_bytes=len(data), read_calls=1)

    def rebuild(storage, storage_offset, size, stride, requires_grad=False, *_):
        if not isinstance(storage, tuple) or len(storage) != 2:
            raise Unsupported("storage")
        dtype, key = storage
        record = f"{prefix}{F.DATA_PREFIX}{key}"
        if record not in spans:
            raise F.FormatError(f"a tensor names storage record {key!r}, which the file does not hold")
        offset, nbytes = spans[record]
        size, stride = tuple(size), tuple(stride)
        _check_extent(dtype, nbytes, storage_offset, size, stride)
        return FileTensor(path, offset, dtype, int(storage_offset), size, stride, bool(requires_grad), nbytes)

    def rebuild_parameter(data, requires_grad, *_):
        if isinstance(data, FileTensor):
            data.is_parameter, data.requires_grad = True, bool(requires_grad)
        return data

    def rebuild_from_type(func, _type, args, _state):
        return func(*args)  # a tensor subclass: its plain data (func is one of the rebuilds above)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if not F.is_identifier_path(module) or not F.is_identifier_path(name):
                raise F.FormatError(f"the pickle names a global {module!r}.{name!r} that is not a Python name")
            # protocol 2 names Python 3's builtins as Python 2's (__builtin__.set): map them as pickle does
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return rebuild
            if module == "torch._utils" and name == "_rebuild_parameter":
                return rebuild_parameter
            if module == "torch._tensor" and name == "_rebuild_from_type_v2":
                return rebuild_from_type
            if module == "torch._utils" and name.startswith("_rebuild"):
                raise Unsupported(name)
            if module == "torch" and name in F.STORAGE_DTYPES:
                return _StorageType(F.STORAGE_DTYPES[name])
            if module == "torch" and name == "Size":
                return F.TorchSize
            if (module, name) in _REAL_GLOBALS:
                return _REAL_GLOBALS[(module, name)]
            if stand_ins is not None:
                stand_ins.add(f"{module}.{name}")
            return F.stub_class(module, name)

        def persistent_load(self, pid):
            if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != "storage" or \
                    not isinstance(pid[1], _StorageType):
                raise F.FormatError(f"a storage reference {str(pid)[:80]} is not one torch.save writes")
            return (pid[1].dtype, str(pid[2]))

    try:
        obj = Unpickler(io.BytesIO(data)).load()
    except (F.FormatError, Unsupported):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or crafted pickle makes the unpickler do
        raise F.FormatError(f"its pickle cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
    _check_expansion(obj, len(data))
    return obj


def _check_expansion(obj: Any, pickle_bytes: int):
    """Objects shared in the pickle are written back (and walked) once per reference: refuse a file
    whose sharing would make that grow far beyond what it holds (``[x, x]`` nested 30 deep)."""
    sizes: Dict[int, int] = {}
    limit = MAX_EXPANSION * (pickle_bytes + 1000)

    def size(o) -> int:
        if id(o) in sizes:
            return sizes[id(o)]
        sizes[id(o)] = 1  # a cycle counts once (the writer refuses cycles anyway)
        if isinstance(o, dict):
            n = 1 + sum(size(k) + size(v) for k, v in o.items())
        elif isinstance(o, (list, tuple, set, frozenset)):
            n = 1 + sum(size(v) for v in o)
        elif isinstance(o, F.Stub):
            n = 1 + size(o._args) + size(o._state)
        else:
            n = 1
        sizes[id(o)] = n
        if n > limit:
            raise F.FormatError(f"its pickle shares objects so that reading it back would build more than {limit} "
                                "objects")
        return n

    try:
        size(obj)
    except RecursionError:
        raise F.FormatError("its pickle nests objects too deeply") from None


def _wrap_loaded(path: str, obj: Any) -> Any:
    import torch
    if torch.is_tensor(obj):
        return FileTensor(path, 0, F.dtype_name(obj.dtype), 0, tuple(obj.shape), tuple(obj.stride()),
                          obj.requires_grad, _loaded=obj)
    if isinstance(obj, dict):
        return type(obj)((k, _wrap_loaded(path, v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_wrap_loaded(path, v) for v in obj)
    return obj
