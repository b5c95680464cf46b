"""Large writes with O_DIRECT (uckpt.directio): the same bytes as buffered writes, the aligned middle
written directly where the file system allows it, a buffered fallback everywhere else."""
import mmap
import os
import zipfile

import pytest
import torch

from uckpt.torchsave import direct as directio
from uckpt.torchsave import writer as tsave
from uckpt.torchsave.format import TensorData
from helpers.checks import direct_supported


def _pattern(nbytes: int):
    buf = directio.buffer(nbytes)
    block = bytes(range(251)) * (nbytes // 251 + 1)  # 251: no period that divides a block
    buf[:] = block[:nbytes]
    return buf


def _sink_write(path, pieces):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sink = directio.Sink(fd, path)
    try:
        for p in pieces:
            sink.write(p)
        sink.flush()
    finally:
        sink.close()
        os.close(fd)


def test_buffer_is_page_aligned_when_large():
    big, small = directio.buffer(directio.MIN_DIRECT), directio.buffer(100)
    assert directio._address(memoryview(big)) % mmap.PAGESIZE == 0
    assert isinstance(small, bytearray) and len(small) == 100


def test_sink_writes_aligned_middle_directly(tmp_path, stats):
    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT (the fallback is tested below)")
    header = b"h" * 4096
    data = _pattern(3 * directio.MIN_DIRECT + 123)  # a tail that is not a whole block
    path = str(tmp_path / "f")
    _sink_write(path, [header, data, b"trailer"])
    with open(path, "rb") as f:
        assert f.read() == header + bytes(data) + b"trailer"
    assert stats["direct_bytes"] == (len(data) // 4096) * 4096
    assert stats["buffered_bytes"] == len(header) + len(data) % 4096 + len(b"trailer")


def test_sink_falls_back_for_unaligned_memory_and_offsets(tmp_path, stats):
    data = _pattern(2 * directio.MIN_DIRECT + 4096)
    path = str(tmp_path / "g")
    _sink_write(path, [b"x" * 10, memoryview(data)[1:]])  # odd file offset and odd address
    with open(path, "rb") as f:
        assert f.read() == b"x" * 10 + bytes(data)[1:]
    assert stats["direct_bytes"] == 0


def test_sink_on_tmpfs_writes_buffered(stats):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    folder = "/dev/shm/uckpt-test-directio-%d" % os.getpid()
    os.makedirs(folder)
    try:
        data = _pattern(2 * directio.MIN_DIRECT)
        path = os.path.join(folder, "h")
        _sink_write(path, [data])
        with open(path, "rb") as f:
            assert f.read() == bytes(data)
        if not direct_supported(folder):
            assert stats["direct_bytes"] == 0 and stats["buffered_bytes"] == len(data)
    finally:
        for n in os.listdir(folder):
            os.remove(os.path.join(folder, n))
        os.rmdir(folder)


def test_large_record_is_block_aligned_and_loads(tmp_path):
    n = (directio.MIN_DIRECT + 4100) // 4
    data = directio.buffer(4 * n)
    data[:] = torch.arange(n, dtype=torch.float32).numpy().tobytes()
    small = torch.arange(7, dtype=torch.float32)
    path = str(tmp_path / "fp32.pt")
    tsave.save({"param": TensorData("float32", (n,), data), "small": TensorData(
        "float32", (7,), bytearray(small.numpy().tobytes()))}, path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded["param"], torch.arange(n, dtype=torch.float32))
    assert torch.equal(loaded["small"], small)
    assert torch.equal(torch.load(path, mmap=True, weights_only=False)["param"], loaded["param"])
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        with open(path, "rb") as f:
            for info in z.infolist():
                f.seek(info.header_offset + 26)
                name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                start = info.header_offset + 30 + name_len + extra_len
                assert start % (4096 if info.file_size >= directio.MIN_DIRECT else 64) == 0, info.filename


def test_copy_file_keeps_bytes_and_times(tmp_path):
    src = tmp_path / "src.pt"
    src.write_bytes(bytes(_pattern(directio.MIN_DIRECT + 777)))
    os.utime(src, (1_000_000_000, 1_000_000_000))
    dst = tmp_path / "dst.pt"
    assert directio.copy_file(str(src), str(dst)) == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_mtime == src.stat().st_mtime
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert directio.copy_file(str(empty), str(tmp_path / "empty2")) == 0
    assert (tmp_path / "empty2").read_bytes() == b""
