"""The output folder: built under ``<output>.uckpt-partial``, published by one rename when complete.

An interrupted run leaves only the partial folder (never a folder that looks complete), and the
next run removes it. ``latest_universal`` is written beside the output as DeepSpeed does, with
the path normalised first so a trailing slash cannot produce an empty tag.
"""
import io
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, List

import torch

from . import constants as C
from .errors import OutputError


def normalise(path: str) -> str:
    return os.path.abspath(os.path.normpath(path))


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_paths(input_folder: str, output_folder: str, overwrite: bool):
    """Refuse outputs that would damage the input or silently replace a previous result."""
    out, inp = normalise(output_folder), normalise(input_folder)
    if _inside(out, inp):
        raise OutputError("lies inside the input checkpoint folder", output_folder,
                          "write the Universal checkpoint beside the input, e.g. ckpts/global_step1000_universal")
    if _inside(inp, out):
        raise OutputError("contains the input checkpoint folder", output_folder,
                          "choose an output folder that does not hold the input")
    if os.path.exists(out) and not overwrite:
        raise OutputError("already exists", output_folder, "pass --overwrite to replace it, or choose another folder")


class OutputFolder:
    def __init__(self, output_folder: str, io_threads: int = 4):
        self.final = normalise(output_folder)
        self.partial = self.final + C.PARTIAL_SUFFIX
        self.zero = os.path.join(self.partial, C.UNIVERSAL_ZERO_FOLDER)
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="uckpt-write")
        self._pending: List[Future] = []
        self.bytes_written = 0
        self.files_written = 0

    # rank 0 only -------------------------------------------------------------------------
    def prepare(self):
        if os.path.exists(self.partial):
            shutil.rmtree(self.partial)  # left by an interrupted run
        os.makedirs(self.zero)

    def publish(self) -> str:
        """Move the complete partial folder into place and point ``latest_universal`` at it."""
        old = None
        if os.path.exists(self.final):
            old = self.final + ".uckpt-old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(self.final, old)
        os.rename(self.partial, self.final)
        if old:
            shutil.rmtree(old)
        parent, tag = os.path.split(self.final)
        latest = os.path.join(parent, C.LATEST_UNIVERSAL_FILE)
        tmp = latest + C.PARTIAL_SUFFIX
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, latest)
        return latest

    def abort(self):
        try:
            self.flush()
        except BaseException:  # noqa: BLE001 - already failing; the folder goes anyway
            pass
        shutil.rmtree(self.partial, ignore_errors=True)

    # any rank ----------------------------------------------------------------------------
    def save(self, obj: Any, *parts: str):
        """Queue ``torch.save(obj)`` to ``<partial>/<parts...>`` on the writer threads."""
        self._pending.append(self._pool.submit(_save, obj, os.path.join(self.partial, *parts)))

    def save_param_state(self, name: str, state: str, obj: Any):
        self.save(obj, C.UNIVERSAL_ZERO_FOLDER, name, state + C.STATE_FILE_SUFFIX)

    def copy(self, src: str):
        self._pending.append(self._pool.submit(_copy, src, self.partial))

    def flush(self):
        """Wait for every queued write, then re-raise the first failure.

        Waiting for all of them matters: a write still in flight after a failure could recreate
        the partial folder after the abort removed it.
        """
        pending, self._pending = self._pending, []
        first = None
        for fut in pending:
            try:
                self.bytes_written += fut.result()
                self.files_written += 1
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                first = first or exc
        if first is not None:
            raise first

    def close(self):
        self._pool.shutdown(wait=True)


SMALL_PAYLOAD_BYTES = 16 << 20


def _payload_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_payload_bytes(v) for v in obj.values())
    return 0


def _save(obj: Any, path: str) -> int:
    """Write one file; returns its size (what the report counts as bytes written).

    ``torch.save`` to a path issues many small writes; for the many small files of a Universal
    checkpoint, serialising to memory and writing once is ~2.7x faster here. Large payloads
    stream to the file directly so they are never held twice in memory.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if _payload_bytes(obj) > SMALL_PAYLOAD_BYTES:
        torch.save(obj, path)
        return os.path.getsize(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())
    return buf.tell()


def _copy(src: str, folder: str) -> int:
    return os.path.getsize(shutil.copy2(src, folder))
