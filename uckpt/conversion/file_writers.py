"""The writer threads' jobs: create parameter folders and files, stream large files, write batches of
small ones from their serialised bytes, copy model files. Each returns what it wrote, (path, bytes,
records digest), which the output folder counts and records for a resumed run."""
import os
import threading
from typing import Any, Dict, List, Tuple

from ..torchsave import direct as directio
from ..torchsave import writer as tsave

Written = List[Tuple[str, int, int]]  # (path, bytes, records digest) of each file a writer made


def save_files(folder: str, files: Dict[str, Any]) -> Written:
    """Create ``folder`` and write ``{path: object}`` (the ``torch.save`` format, see
    :mod:`uckpt.torchsave.writer`), streaming."""
    os.makedirs(folder, exist_ok=True)
    return [(path, *_save(obj, path)) for path, obj in files.items()]


class FolderProgress:
    """How many folders of a batch exist; writers wait for theirs (or stop when making them failed)."""

    def __init__(self):
        self.count, self.failed = 0, False
        self.cond = threading.Condition()

    def advance(self):
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def fail(self):
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def wait_for(self, i: int) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.count > i or self.failed)
            return self.count > i


def make_folders(folders: List[str], made: FolderProgress) -> Written:
    try:
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            made.advance()
    except BaseException:
        made.fail()
        raise
    return []


def write_images(batch: List[Tuple[str, Dict[str, Tuple[bytes, int]]]], items, made: FolderProgress) -> Written:
    """Write the files of ``batch[i]`` for each ``i`` of ``items`` from their serialised bytes, once its
    folder exists."""
    out = []
    for i in items:
        if not made.wait_for(i):
            break  # the folder thread failed; it reports why
        for path, (data, digest) in batch[i][1].items():
            out.append((path, _write_image(path, data), digest))
    return out


def _save(obj: Any, path: str) -> Tuple[int, int]:
    return tsave.save_recorded(obj, path)


def image(obj: Any, path: str) -> Tuple[bytes, int]:
    """A small file's bytes and records digest, serialised now and written later in a batch."""
    return tsave.to_bytes(obj, path)  # the writer knows the records' CRCs: no second parse of the zip


def _write_image(path: str, data: bytes) -> int:
    return tsave.write_bytes(path, data)


def copy(src: str, folder: str) -> Written:
    dst = os.path.join(folder, os.path.basename(src))
    return [(dst, directio.copy_file(src, dst), 0)]
