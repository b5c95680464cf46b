#!/usr/bin/env python
"""The copy floor of a conversion: read every input byte once, then write the output's bytes once.

No parsing and no copies in memory: the input tag folder's files are read in 64 MiB ranges by
``--threads`` threads (``preadv`` into one reused buffer each, as uckpt's readers issue several
reads at once), then the files of a reference output folder are recreated under ``--output``
with the same relative names and sizes by the same threads, each file ``fsync``'d, then their
folders. scripts/bench_convert.py reports every tool's wall time against this one, measured cold
in the same run.

    python scripts/copy_floor.py --input TAG_FOLDER --like REFERENCE_OUTPUT --output NEW_FOLDER
"""
import argparse
import os
import threading
from concurrent.futures import ThreadPoolExecutor

CHUNK = 64 << 20


def _files(folder: str):
    return [os.path.join(r, n) for r, _, names in os.walk(folder) for n in sorted(names)]


def read_all(folder: str, threads: int) -> int:
    ranges = [(p, off, min(CHUNK, os.path.getsize(p) - off)) for p in _files(folder)
              for off in range(0, os.path.getsize(p), CHUNK)]
    local = threading.local()

    def read_range(item):
        path, off, n = item
        if not hasattr(local, "buf"):
            local.buf = memoryview(bytearray(CHUNK))  # one per thread, reused
        buf = local.buf[:n]
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while got < n:
                k = os.preadv(fd, [buf[got:]], off + got)
                if not k:
                    break
                got += k
            return got
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(read_range, ranges))


def write_like(reference: str, output: str, threads: int) -> int:
    block = bytes(CHUNK)
    folders = set()
    jobs = []
    for path in _files(reference):
        target = os.path.join(output, os.path.relpath(path, reference))
        folders.add(os.path.dirname(target))
        jobs.append((target, os.path.getsize(path)))
    for folder in sorted(folders):
        os.makedirs(folder, exist_ok=True)

    def write(job):
        target, size = job
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left:
                left -= os.write(fd, memoryview(block)[:min(left, CHUNK)])
            os.fsync(fd)
        finally:
            os.close(fd)
        return size

    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(write, sorted(jobs, key=lambda j: -j[1])))
    for folder in sorted(folders, key=len, reverse=True) + [output]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--like", required=True, help="an output folder whose file names and sizes are written")
    ap.add_argument("--output", required=True)
    ap.add_argument("--threads", type=int, default=4, help="reads and writes in flight (uckpt's io.threads default)")
    args = ap.parse_args()
    read = read_all(args.input, args.threads)
    written = write_like(args.like, args.output, args.threads)
    print(f"read {read} bytes, wrote {written} bytes")


if __name__ == "__main__":
    main()
