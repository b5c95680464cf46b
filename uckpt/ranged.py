"""Read byte ranges of tensors inside a ``torch.save`` file, without loading the whole file.

A ``torch.save`` file is an uncompressed zip: a small pickle plus one record per storage. This
module unpickles the pickle with every tensor replaced by a :class:`FileTensor` (where its bytes
are in the file, dtype, shape, strides) and reads element ranges with ``os.pread``. A loading rank
therefore reads the bytes of the slices it keeps and the pickle, nothing else, and the count is
exact: :data:`STATS` adds up every byte requested from the file system.

Anything that is not the plain zip format (legacy files, unknown rebuild functions) falls back to
``torch.load(mmap=True)``; the values are the same, only the byte count covers whole pages.
"""
import io
import os
import pickle
import struct
import threading
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"


class ReadStats:
    """Bytes and read calls this process asked the file system for through this module."""

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes = 0
        self.calls = 0

    def add(self, n: int):
        with self._lock:
            self.bytes += n
            self.calls += 1

    def snapshot(self) -> Tuple[int, int]:
        return self.bytes, self.calls


STATS = ReadStats()


def _pread_into(fd: int, view: memoryview, offset: int):
    """Fill ``view`` with the file's bytes from ``offset`` (straight into the destination, no copy)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise EOFError(f"file ends at byte {offset + done}, {len(view) - done} bytes short")
        done += got
    STATS.add(len(view))


def row_major_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= int(dim)
    return tuple(reversed(strides))


@dataclass
class FileTensor:
    """A tensor that still lives in its file: ``data_offset`` is the byte where its storage begins."""

    path: str
    data_offset: int
    dtype: torch.dtype
    storage_offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    _loaded: Any = None  # fallback: a real (memory-mapped) tensor

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def contiguous(self) -> bool:
        return all(s == r for s, r, d in zip(self.stride, row_major_strides(self.shape), self.shape) if d > 1)

    def read_strided(self, offset: int, shape: Sequence[int], strides: Sequence[int]) -> torch.Tensor:
        """Elements ``as_strided(flat, shape, strides, offset)`` of this tensor viewed as a flat
        row-major buffer, read with one ``pread`` per contiguous run."""
        shape, strides = tuple(int(d) for d in shape), tuple(int(s) for s in strides)
        if self._loaded is not None or not self.contiguous:
            flat = self.load().reshape(-1)
            return torch.as_strided(flat, shape, strides, offset).clone()
        numel = 1
        for d in shape:
            numel *= d
        out = torch.empty(numel, dtype=self.dtype)
        if numel == 0:
            return out.view(shape)
        # the trailing dimensions that are densely packed form one run per leading index
        run, k = 1, len(shape)
        while k > 0 and (shape[k - 1] == 1 or strides[k - 1] == run):
            run *= shape[k - 1]
            k -= 1
        lead_shape = shape[:k]
        starts: List[int] = []
        idx = [0] * k
        while True:
            starts.append(offset + sum(i * s for i, s in zip(idx, strides[:k])))
            a = k - 1
            while a >= 0:
                idx[a] += 1
                if idx[a] < lead_shape[a]:
                    break
                idx[a] = 0
                a -= 1
            if a < 0:
                break
        size = torch.empty(0, dtype=self.dtype).element_size()
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
                _pread_into(fd, buf[pos:pos + nbytes], base + starts[i] * size)
                pos += nbytes
                i = j
        finally:
            os.close(fd)
        return out.view(shape)

    def load(self) -> torch.Tensor:
        """The whole tensor (reads all of its bytes)."""
        if self._loaded is not None:
            return self._loaded
        extent = 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride)) if self.numel() else 0
        flat = FileTensor(self.path, self.data_offset, self.dtype, self.storage_offset, (extent,), (1,))
        return torch.as_strided(flat.read_strided(0, (extent,), (1,)), self.shape, self.stride, 0)


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype):
        self.key, self.dtype = key, dtype


class _Unsupported(Exception):
    pass


def _data_offsets(zf: zipfile.ZipFile, raw) -> Dict[str, int]:
    out = {}
    for info in zf.infolist():
        raw.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_HEADER_MAGIC or info.compress_type != zipfile.ZIP_STORED:
            raise _Unsupported(info.filename)
        out[info.filename] = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    return out


def open_lazy(path: str) -> Any:
    """The object saved in ``path`` with each tensor as a :class:`FileTensor` (no tensor bytes read)."""
    try:
        return _open_zip(path)
    except Exception:  # anything this reader does not know: torch's own loader gives the same values
        mmap = zipfile.is_zipfile(path)  # the legacy format cannot be memory-mapped
        return _wrap_loaded(path, torch.load(path, map_location="cpu", mmap=mmap, weights_only=False))


def _open_zip(path: str) -> Any:
    with open(path, "rb") as raw:
        zf = zipfile.ZipFile(raw)
        names = zf.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
        prefix = pkl[:-len("data.pkl")]
        offsets = _data_offsets(zf, raw)
        data = zf.read(pkl)
        STATS.add(len(data))

    def rebuild(storage, storage_offset, size, stride, *_):
        if not isinstance(storage, _Storage):
            raise _Unsupported("storage")
        return FileTensor(path, offsets[f"{prefix}data/{storage.key}"], storage.dtype, int(storage_offset),
                          tuple(size), tuple(stride))

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return rebuild
            if module == "torch._utils" and name == "_rebuild_parameter":
                return lambda data, *_: data  # an nn.Parameter: its data is what is read
            if module == "torch._tensor" and name == "_rebuild_from_type_v2":
                return lambda func, _type, args, _state: func(*args)  # a tensor subclass: its plain data
            if module == "torch._utils" and name.startswith("_rebuild"):
                raise _Unsupported(name)
            return super().find_class(module, name)

        def persistent_load(self, pid):
            if pid[0] != "storage":
                raise _Unsupported(str(pid[0]))
            storage_type, key = pid[1], pid[2]
            with warnings.catch_warnings():  # the legacy storage classes warn when asked their dtype
                warnings.simplefilter("ignore")
                dtype = storage_type if isinstance(storage_type, torch.dtype) else getattr(storage_type, "dtype", None)
            if not isinstance(dtype, torch.dtype):
                raise _Unsupported("storage type")
            return _Storage(str(key), dtype)

    return Unpickler(io.BytesIO(data)).load()


def _wrap_loaded(path: str, obj: Any) -> Any:
    if torch.is_tensor(obj):
        return FileTensor(path, 0, obj.dtype, 0, tuple(obj.shape), tuple(obj.stride()), _loaded=obj)
    if isinstance(obj, dict):
        return type(obj)((k, _wrap_loaded(path, v)) for k, v in obj.items())
    return obj
