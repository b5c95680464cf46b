"""Making an output durable and trusting what a dead run left: folder fsyncs, ``syncfs`` of a whole file
system, and the resume records (the key a rerun must match, and the check of a recorded file)."""
import ctypes
import ctypes.util
import json
import os
import zipfile
from typing import Any, Dict, List, Optional

from ..torchsave import writer as tsave
from ..torchsave.zipfmt import records_crcs, verify_crc

RESUME_FOLDER = ".uckpt-resume"  # inside a partial folder: what a rerun needs to resume it (removed on publish)
RESUME_KEY_FILE = "key.json"


def fsync_dir(path: str):
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str):
    """Make a file's bytes durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def syncfs(path: str):
    """Flush the file system holding ``path`` (Linux ``syncfs``); ``os.sync`` where it is missing."""
    if not hasattr(LIBC, "syncfs"):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", path)
    finally:
        os.close(fd)


def holds_links(folder: str) -> bool:
    """Whether anything below ``folder`` is a symbolic link (a partial folder that does is not resumed:
    writes would follow the link out of the output)."""
    for root, dirs, files in os.walk(folder):
        if any(os.path.islink(os.path.join(root, n)) for n in dirs + files):
            return True
    return False


def write_json(path: str, value: Any):
    with open(path, "w") as f:
        json.dump(value, f, sort_keys=True)


def resume_key(partial: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(partial, RESUME_FOLDER, RESUME_KEY_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def intact(partial: str, files: Dict[str, List[int]]) -> bool:
    """Every file of a recorded parameter is as recorded (see :meth:`OutputFolder.reusable`)."""
    try:
        for rel, (size, digest) in files.items():
            path = os.path.join(partial, rel)
            if os.path.relpath(os.path.realpath(path), os.path.realpath(partial)).startswith(".."):
                return False  # a manifest is ours, but a path in it never leaves the folder
            if os.path.getsize(path) != size or tsave.records_digest(records_crcs(path)) != digest:
                return False
            verify_crc(path)
    except (OSError, ValueError, zipfile.BadZipFile, TypeError):
        return False
    return True
