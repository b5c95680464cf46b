"""The zip side of a ``torch.save`` file: where each record's data lies (checked to be inside the file),
and each record's bytes against the CRC-32 its central directory holds. Used by the reader, by the
converter's integrity pass and by a resumed run's check of the files a dead run wrote."""
import os
import struct
import zipfile
import zlib
from typing import Dict, List, Tuple

from . import format as F
from .stats import IO

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"


def pread_into(fd: int, view: memoryview, offset: int):
    """Fill ``view`` with the file's bytes from ``offset`` (straight into the destination, no copy);
    every byte is counted in :data:`uckpt.torchsave.stats.IO`."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise EOFError(f"file ends at byte {offset + done}, {len(view) - done} bytes short")
        done += got
    IO.add(read_bytes=len(view), read_calls=1)


class Unsupported(Exception):
    """A file the codec does not read itself (compressed records, the legacy format): torch reads it."""


def records(zf: zipfile.ZipFile, raw) -> Dict[str, Tuple[int, int]]:
    """Each stored record's (data offset, size), each checked to lie inside the file."""
    out = {}
    end = os.fstat(raw.fileno()).st_size
    for info in zf.infolist():
        raw.seek(info.header_offset)
        header = raw.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            raise F.FormatError(f"record {info.filename} starts past the end of the file")
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_HEADER_MAGIC or info.compress_type != zipfile.ZIP_STORED:
            raise Unsupported(info.filename)
        offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        if info.compress_size != info.file_size or offset + info.file_size > end:
            raise F.FormatError(f"record {info.filename} declares {info.file_size} bytes at offset {offset}, past "
                                f"the end of the {end}-byte file")
        out[info.filename] = (offset, info.file_size)
    return out


def record_spans(path: str) -> Dict[str, Tuple[int, int]]:
    """Each record of a ``torch.save`` zip: its name -> (offset of its data in the file, size)."""
    with open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
        return records(zf, raw)


def records_crcs(path: str) -> List[int]:
    """The CRC-32 of each record, in file order, as the zip's central directory holds them (no data read)."""
    with zipfile.ZipFile(path) as zf:
        return [info.CRC for info in sorted(zf.infolist(), key=lambda i: i.header_offset)]


def verify_crc(path: str, chunk: int = 16 << 20) -> int:
    """Check every record of a ``torch.save`` zip against the CRC-32 its central directory holds,
    streaming each record once; returns the bytes checked. A legacy (non-zip) file has no CRCs: 0."""
    with open(path, "rb") as raw:
        try:
            zf = zipfile.ZipFile(raw)
        except zipfile.BadZipFile:
            if legacy(raw):
                return 0
            raise F.FormatError("is not a torch.save file (neither a zip archive nor torch's legacy format)") \
                from None
        try:
            spans = records(zf, raw)
        except Unsupported as exc:
            raise F.FormatError(f"record {exc} is compressed or has a damaged header") from None
        infos = zf.infolist()
    fd = os.open(path, os.O_RDONLY)
    checked = 0
    try:
        buf = bytearray(min(chunk, max([i.file_size for i in infos] + [1])))
        for info in infos:
            offset, size = spans[info.filename]
            crc, done = 0, 0
            while done < size:
                view = memoryview(buf)[:min(len(buf), size - done)]
                pread_into(fd, view, offset + done)
                crc = zlib.crc32(view, crc)
                done += len(view)
            if crc != info.CRC:
                raise F.FormatError(f"record {info.filename} fails its CRC-32 check ({crc:08x}, the zip records "
                                    f"{info.CRC:08x}): its bytes are damaged")
            checked += size
    finally:
        os.close(fd)
    return checked


def legacy(raw) -> bool:
    raw.seek(0)
    return raw.read(2) == b"\x80\x02"  # the pre-zip torch.save format starts with a pickle
