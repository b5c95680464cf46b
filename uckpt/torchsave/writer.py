"""Write ``torch.save`` files without torch: the same zip records, pickle protocol and alignment.

Any object the converter writes is a tree of dicts, lists and scalars with tensors in it. Tensors
come as :class:`~uckpt.torchfmt.TensorData` (bytes in memory), :class:`~uckpt.ranged.FileTensor`
(bytes still in an input file, copied through) or torch tensors (when torch is loaded anyway);
classes read without their module are :class:`~uckpt.torchfmt.Stub` stand-ins and are pickled
back to the same class. The result loads with ``torch.load`` (and ``mmap=True``: data records are
aligned to 64 bytes as torch aligns them) into the objects ``torch.save`` would have written.

Layout (torch's ``PyTorchStreamWriter``): ``<stem>/data.pkl``, ``.format_version``,
``.storage_alignment``, ``byteorder``, one ``data/<key>`` per storage, ``version`` and
``.data/serialization_id``; each record stored (no compression) with a data descriptor; zip64
records where a size or offset passes 4 GiB.
"""
import io
import itertools
import os
import pickle
import struct
import zlib
from contextlib import contextmanager
from typing import Any, Dict, List, Tuple

from . import direct as directio
from . import format as F
from .reader import FileTensor

_U32 = 0xFFFFFFFF
_ZIP64_AT = _U32  # sizes and offsets from here on need zip64 fields (a test lowers it)


# --- pickle (protocol 2, no memo: the trees written here share no mutable objects) -------------

def _global(module: str, name: str) -> bytes:
    if not (F.is_identifier_path(module) and F.is_identifier_path(name)):  # a newline would inject opcodes
        raise ValueError(f"cannot write the global {module!r}.{name!r}: not a Python name")
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"
_BATCH = 1000


class _Storage:
    """One storage record: where its bytes come from."""

    __slots__ = ("key", "nbytes", "mem", "file")

    def __init__(self, key: str, nbytes: int, mem=None, file: Tuple[str, int] = None):
        self.key, self.nbytes, self.mem, self.file = key, nbytes, mem, file


class _Pickler:
    def __init__(self):
        self.out: List[bytes] = []
        self.storages: Dict[Any, _Storage] = {}

    def dumps(self, obj: Any) -> bytes:
        self.out = [b"\x80\x02"]
        self._save(obj)
        self.out.append(b".")
        return b"".join(self.out)

    def _storage(self, ident, nbytes: int, mem=None, file=None) -> str:
        if ident not in self.storages:
            self.storages[ident] = _Storage(str(len(self.storages)), nbytes, mem, file)
        return self.storages[ident].key

    def _tensor(self, dtype: str, key: str, storage_numel: int, offset: int, shape, stride, requires_grad: bool):
        w = self.out.append
        w(_global("torch._utils", "_rebuild_tensor_v2") + b"((")
        self._save("storage")
        w(_global("torch", F.DTYPES[dtype][1]))
        self._save(key)
        self._save("cpu")
        self._save(storage_numel)
        w(b"tQ")
        self._save(int(offset))
        self._save(tuple(int(d) for d in shape))
        self._save(tuple(int(s) for s in stride))
        self._save(bool(requires_grad))
        w(_ORDERED_DICT + b"tR")

    def _save_tensor(self, obj: Any):
        if isinstance(obj, FileTensor) and obj._loaded is None:
            key = self._storage((obj.path, obj.data_offset), obj.storage_nbytes, file=(obj.path, obj.data_offset))
            size = F.itemsize(obj.dtype)
            args = (obj.dtype, key, obj.storage_nbytes // size, obj.storage_offset, obj.shape, obj.stride,
                    obj.requires_grad)
        elif isinstance(obj, F.TensorData):
            mem = memoryview(obj.data).cast("B")
            key = self._storage(("mem", id(obj.data)), len(mem), mem=mem)
            stride = obj.stride if obj.stride is not None else F.row_major_strides(obj.shape)
            args = (obj.dtype, key, len(mem) // F.itemsize(obj.dtype), obj.storage_offset, obj.shape, stride,
                    obj.requires_grad)
        else:  # a torch tensor (or a FileTensor torch loaded)
            t = obj._loaded if isinstance(obj, FileTensor) else obj
            import torch
            t = t.detach().cpu()
            st = t.untyped_storage()
            flat = torch.empty(0, dtype=torch.uint8)
            if st.nbytes():
                flat.set_(st, 0, (st.nbytes(),), (1,))
            key = self._storage(("torch", st.data_ptr(), st.nbytes()), st.nbytes(), mem=memoryview(flat.numpy()))
            dtype = F.dtype_name(t.dtype)
            args = (dtype, key, st.nbytes() // F.itemsize(dtype), t.storage_offset(), t.shape, t.stride(),
                    obj.requires_grad if isinstance(obj, FileTensor) else t.requires_grad)
        parameter = getattr(obj, "is_parameter", False) or type(obj).__name__ == "Parameter"
        if parameter:
            self.out.append(_global("torch._utils", "_rebuild_parameter") + b"(")
        self._tensor(*args)
        if parameter:
            self._save(bool(args[-1]))
            self.out.append(_ORDERED_DICT + b"tR")

    def _save(self, obj: Any):
        w = self.out.append
        t = type(obj)
        if obj is None:
            w(b"N")
        elif t is bool:
            w(b"\x88" if obj else b"\x89")
        elif t is int:
            if 0 <= obj < 256:
                w(b"K" + bytes((obj,)))
            elif 0 <= obj < 65536:
                w(b"M" + struct.pack("<H", obj))
            elif -2**31 <= obj < 2**31:
                w(b"J" + struct.pack("<i", obj))
            else:
                enc = pickle.encode_long(obj)
                w(b"\x8a" + bytes((len(enc),)) + enc)
        elif t is float:
            w(b"G" + struct.pack(">d", obj))
        elif t is str:
            enc = obj.encode("utf-8", "surrogatepass")
            w(b"X" + struct.pack("<I", len(enc)) + enc)
        elif t is dict or t.__name__ == "OrderedDict" and t.__module__ == "collections":
            w(b"}" if t is dict else _ORDERED_DICT)
            self._items(list(obj.items()))
        elif t is list:
            w(b"]")
            for i in range(0, len(obj), _BATCH):
                w(b"(")
                for v in obj[i:i + _BATCH]:
                    self._save(v)
                w(b"e")
        elif t is tuple:
            self._tuple(obj)
        elif t is F.TorchSize or t.__name__ == "Size" and t.__module__ == "torch":
            w(_global("torch", "Size"))
            self._tuple((tuple(int(d) for d in obj),))
            w(b"R")
        elif isinstance(obj, (FileTensor, F.TensorData)) or F.is_torch_tensor(obj):
            self._save_tensor(obj)
        elif isinstance(obj, F.Stub):
            w(_global(t._module, t._qualname))
            self._tuple(obj._args)
            w(b"R" if obj._called else b"\x81")
            if obj._state is not None:
                self._save(obj._state)
                w(b"b")
        elif F.is_stub_class(obj):
            w(_global(obj._module, obj._qualname))
        elif t.__name__ == "dtype" and t.__module__ == "torch":
            w(_global("torch", F.dtype_name(obj)))
        else:
            w(_splice(obj))

    def _items(self, items):
        for i in range(0, len(items), _BATCH):
            self.out.append(b"(")
            for k, v in items[i:i + _BATCH]:
                self._save(k)
                self._save(v)
            self.out.append(b"u")

    def _tuple(self, obj: tuple):
        if not obj:
            self.out.append(b")")
            return
        if len(obj) > 3:
            self.out.append(b"(")
        for v in obj:
            self._save(v)
        self.out.append(b"t" if len(obj) > 3 else b"\x85\x86\x87"[len(obj) - 1:len(obj)])


def payload_bytes(obj: Any) -> int:
    """Tensor bytes in ``obj`` (dicts, lists and tensors of any kind), as a size hint for scheduling."""
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    if isinstance(obj, FileTensor):
        return obj.storage_nbytes
    if isinstance(obj, F.TensorData):
        return len(memoryview(obj.data).cast("B"))
    if F.is_torch_tensor(obj):
        return obj.numel() * obj.element_size()
    return 0


class _NoTensors(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, (FileTensor, F.TensorData)) or F.is_torch_tensor(obj):
            raise pickle.PicklingError(f"a tensor inside a {type(obj).__name__} object cannot be written here")
        return None


def _splice(obj: Any) -> bytes:
    """Any other picklable object, pickled by the standard pickler (its memo indices never collide with
    ours: this pickle uses none) without its PROTO header and STOP."""
    buf = io.BytesIO()
    _NoTensors(buf, protocol=F.PICKLE_PROTOCOL).dump(obj)
    data = buf.getvalue()
    assert data[:2] == b"\x80\x02" and data[-1:] == b"."
    return data[2:-1]


# --- zip records --------------------------------------------------------------------------------

class _ZipWriter:
    def __init__(self, f):
        self.f = f
        self.pos = 0
        self.entries: List[Tuple[bytes, int, int, int]] = []  # name, header offset, size, crc

    def _write(self, data):
        self.f.write(data)
        self.pos += len(data)

    def record(self, name: str, size: int, chunks):
        """One stored record of ``size`` bytes from the byte chunks ``chunks`` yields."""
        raw = name.encode()
        big = size >= _ZIP64_AT  # (a far offset only matters in the central directory)
        extra = struct.pack("<HHQQ", 1, 16, 0, 0) if big else b""
        pad = -(self.pos + 30 + len(raw) + len(extra) + 4) % directio.alignment(size)
        extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        header_offset = self.pos
        self._write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45 if big else 20, 0x808, 0, 0, 0, 0,
                                _U32 if big else 0, _U32 if big else 0, len(raw), len(extra)) + raw + extra)
        crc, done = 0, 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            self._write(chunk)
            done += len(chunk)
        if done != size:
            raise IOError(f"record {name}: {done} bytes written, {size} expected")
        if big:
            self._write(struct.pack("<4sIQQ", b"PK\x07\x08", crc, size, size))
        else:
            self._write(struct.pack("<4sIII", b"PK\x07\x08", crc, size, size))
        self.entries.append((raw, header_offset, size, crc))

    def finish(self):
        cd_offset = self.pos
        for raw, offset, size, crc in self.entries:
            big, far = size >= _ZIP64_AT, offset >= _ZIP64_AT
            z64 = (struct.pack("<QQ", size, size) if big else b"") + (struct.pack("<Q", offset) if far else b"")
            extra = struct.pack("<HH", 1, len(z64)) + z64 if z64 else b""
            self._write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 45 if z64 else 20, 0x808, 0, 0, 0, crc,
                                    _U32 if big else size, _U32 if big else size, len(raw), len(extra), 0, 0, 0, 0,
                                    _U32 if far else offset) + raw + extra)
        cd_size = self.pos - cd_offset
        n = len(self.entries)
        if cd_offset >= _ZIP64_AT or cd_size >= _ZIP64_AT or n >= 0xFFFF:
            z64_offset = self.pos
            self._write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_offset))
            self._write(struct.pack("<4sIQI", b"PK\x06\x07", 0, z64_offset, 1))
        z64 = cd_offset >= _ZIP64_AT or cd_size >= _ZIP64_AT
        self._write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                                _U32 if z64 else cd_size, _U32 if z64 else cd_offset, 0))


_IDS = itertools.count()
_ID_BASE = int.from_bytes(os.urandom(8), "little")


def _write_zip(obj: Any, stem: str, sink) -> Tuple[int, int]:
    """The whole file for ``obj`` into ``sink`` (anything with ``write``); returns its size and
    :func:`records_digest`."""
    pickler = _Pickler()
    pkl = pickler.dumps(obj)
    records = [(F.DATA_PKL, len(pkl), lambda: [pkl]),
               (F.FORMAT_VERSION[0], len(F.FORMAT_VERSION[1]), lambda: [F.FORMAT_VERSION[1]]),
               (F.STORAGE_ALIGNMENT[0], len(F.STORAGE_ALIGNMENT[1]), lambda: [F.STORAGE_ALIGNMENT[1]]),
               (F.BYTEORDER[0], len(F.BYTEORDER[1]), lambda: [F.BYTEORDER[1]])]
    for st in pickler.storages.values():
        if st.mem is not None:
            records.append((F.DATA_PREFIX + st.key, st.nbytes, lambda m=st.mem: [m] if len(m) else []))
        else:
            records.append((F.DATA_PREFIX + st.key, st.nbytes,
                            lambda s=st: directio.file_chunks(s.file[0], s.file[1], s.nbytes)))
    ident = f"{_ID_BASE:020d}{next(_IDS):020d}".encode()  # torch writes a 40-digit id; unique per file here
    records += [(F.VERSION[0], len(F.VERSION[1]), lambda: [F.VERSION[1]]),
                (F.SERIALIZATION_ID, len(ident), lambda: [ident])]
    z = _ZipWriter(sink)
    for name, size, chunks in records:
        z.record(f"{stem}/{name}", size, chunks())
    z.finish()
    return z.pos, records_digest(crc for _, _, _, crc in z.entries)


def records_digest(crcs) -> int:
    """A file's checksum from its records' CRC-32s, in order: what a resumed conversion compares (with
    each record checked against its CRC) to trust a file an earlier run wrote."""
    return zlib.crc32(b"".join(struct.pack("<I", c) for c in crcs))


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0] or "archive"  # torch names the zip's folder so


@contextmanager
def _created(path: str):
    """A new (or truncated) file's descriptor, closed afterwards."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        yield fd
    finally:
        os.close(fd)


def save(obj: Any, path: str) -> int:
    """Write ``obj`` to ``path`` as ``torch.save(obj, path)`` would, streaming; returns the file's size."""
    return save_recorded(obj, path)[0]


def save_recorded(obj: Any, path: str) -> Tuple[int, int]:
    """:func:`save`, returning the file's size and :func:`records_digest`."""
    with _created(path) as fd:
        sink = directio.Sink(fd, path)
        try:
            recorded = _write_zip(obj, _stem(path), sink)
            sink.flush()
        finally:
            sink.close()
    return recorded


def to_bytes(obj: Any, path: str) -> Tuple[bytes, int]:
    """The bytes ``save(obj, path)`` would write (for small files, written later in a batch), and
    their :func:`records_digest`."""
    sink = io.BytesIO()
    _, digest = _write_zip(obj, _stem(path), sink)
    return sink.getvalue(), digest


def write_bytes(path: str, data) -> int:
    """Create ``path`` holding ``data``: open, write, close."""
    with _created(path) as fd:
        directio.write_all(fd, memoryview(data).cast("B"), 0)
    return len(data)


__all__ = ["save", "save_recorded", "records_digest", "to_bytes", "write_bytes", "payload_bytes"]
