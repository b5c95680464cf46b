#!/usr/bin/env python
"""Are two code trees' conversions byte-identical? (The restructuring's check: behaviour unchanged.)

    python scripts/cmp_outputs.py convert --tree /path/to/old/checkout --out runs/cmp/before
    python scripts/cmp_outputs.py convert --tree . --out runs/cmp/after
    python scripts/cmp_outputs.py compare runs/cmp/before runs/cmp/after

``convert`` builds (once, cached under ``--ckpts``) real DeepSpeed checkpoints: the benchmark's
small- and large-tensors cases (ZeRO-2 bf16 DP=4), dense ZeRO-3, pipeline, AutoTP (tiny Llama and
the custom module at TP=3) and AutoEP (ZeRO-1/2 and partition-native ZeRO-3); then it converts
each with ``python -m uckpt convert`` (one process) and ``torchrun`` (two ranks), running the
uckpt package of ``--tree``.

``compare`` compares every ``.pt`` file of the two output trees byte for byte. Each file uckpt
writes carries a ``.data/serialization_id`` record that is unique per file by design (torch writes
a random one too); those 40 bytes and the record's two CRC-32 copies, and only those, are skipped,
and the report says how many bytes were.
The JSON report (timings) is not compared. Exit 1 on any difference.
"""
import argparse
import os
import struct
import subprocess
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
from examples import runner  # noqa: E402

BENCH = {
    "small-tensors": ("examples.tiny_train", 4, ["--zero-stage", "2", "--dtype", "bf16", "--steps", "1",
                                                  "--layers", "800", "--hidden", "64", "--vocab", "64"]),
    "large-tensors": ("examples.tiny_train", 4, ["--zero-stage", "2", "--dtype", "bf16", "--steps", "1",
                                                  "--layers", "6", "--hidden", "2048", "--vocab", "256"]),
}
SUITE = {
    "z3-fp32-dp3": ("examples.tiny_train", 3, ["--zero-stage", "3", "--dtype", "fp32", "--steps", "3"]),
    "pp2-dp2": ("examples.pipe_train", 4, ["--stages", "2", "--steps", "2"]),
    "tp2-dp2-z2-bf16": ("examples.autotp_train", 4, ["--tp", "2", "--zero-stage", "2", "--dtype", "bf16",
                                                      "--steps", "2"]),
    "tp3-custom-z1-bf16": ("examples.autotp_train", 3, ["--model", "custom", "--tp", "3", "--zero-stage", "1",
                                                         "--dtype", "bf16", "--steps", "2"]),
    "ep2-dp4-z1-fp32": ("examples.autoep_train", 4, ["--ep", "2", "--zero-stage", "1", "--dtype", "fp32",
                                                      "--steps", "2"]),
    "ep2-dp2-z3-bf16": ("examples.autoep_train", 2, ["--ep", "2", "--zero-stage", "3", "--dtype", "bf16",
                                                      "--steps", "2"]),
}
CASES = {**BENCH, **SUITE}
SERIALIZATION_ID = ".data/serialization_id"


def tag_folder(ckpts: str, case: str) -> str:
    """The case's checkpoint tag folder, trained once with real DeepSpeed."""
    module, nproc, args = CASES[case]
    return runner.cached_checkpoint(os.path.join(ckpts, case), nproc, args, module)


def convert(tree: str, ckpts: str, out: str, cases):
    tree = os.path.abspath(tree)
    env = {"PYTHONPATH": tree}  # the tree's uckpt package, ahead of any installed one
    for case in cases:
        tag = tag_folder(ckpts, case)
        for nproc in (1, 2):
            dst = os.path.join(out, case, f"n{nproc}", "universal")
            args = ["-m", "uckpt", "convert", "--input_folder", tag, "--output_folder", dst, "--quiet",
                    "--inject_missing_state"]
            cmd = [sys.executable, *args] if nproc == 1 else runner.torchrun_cmd(nproc, args)
            proc = subprocess.run(cmd, cwd=tree, env=runner.env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
            if proc.returncode:
                raise SystemExit(f"{case} n{nproc}: conversion failed\n{proc.stdout[-3000:]}")
            print(f"converted {case} with {nproc} rank(s) -> {dst}", flush=True)


def _id_spans(path: str):
    """Byte ranges of a torch.save file that hold its serialization id: the record's data and the two
    copies of its CRC-32 (data descriptor and central directory); None if the file has no such record."""
    from uckpt.torchsave.zipfmt import record_spans

    try:
        spans = record_spans(path)
        start_dir = zipfile.ZipFile(path).start_dir
    except (zipfile.BadZipFile, ValueError, OSError):
        return None
    name = next((n for n in spans if n.endswith(SERIALIZATION_ID)), None)
    if name is None:
        return None
    with open(path, "rb") as f:
        raw = f.read()
    start, size = spans[name]
    out = [(start, start + size), (start + size + 4, start + size + 8)]  # data, then the descriptor's CRC
    pos = start_dir
    while raw[pos:pos + 4] == b"PK\x01\x02":  # the central directory: one entry per record
        n, e, c = struct.unpack_from("<HHH", raw, pos + 28)
        if raw[pos + 46:pos + 46 + n].decode() == name:
            out.append((pos + 16, pos + 20))
        pos += 46 + n + e + c
    return out


def _masked(data: bytes, spans) -> bytes:
    out = bytearray(data)
    for a, b in spans:
        out[a:b] = bytes(b - a)
    return bytes(out)


def compare(a: str, b: str) -> int:
    files = {os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs if f.endswith(".pt")}
    other = {os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs if f.endswith(".pt")}
    bad = [f"only in {a}: {p}" for p in sorted(files - other)] + [f"only in {b}: {p}" for p in sorted(other - files)]
    masked = total = 0
    for rel in sorted(files & other):
        with open(os.path.join(a, rel), "rb") as f:
            x = f.read()
        with open(os.path.join(b, rel), "rb") as f:
            y = f.read()
        total += len(x)
        if x == y:
            continue
        spans = _id_spans(os.path.join(a, rel))
        if len(x) != len(y) or spans is None or spans != _id_spans(os.path.join(b, rel)) or \
                _masked(x, spans) != _masked(y, spans):
            bad.append(f"differs: {rel}")
        else:
            masked += sum(e - s for s, e in spans)
    for line in bad:
        print(line)
    print(f"{len(files & other)} .pt files, {total} bytes compared: {len(bad)} differences "
          f"({masked} bytes of serialization ids and their CRCs skipped)")
    return 1 if bad or not files else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert")
    p.add_argument("--tree", required=True, help="checkout whose uckpt package converts")
    p.add_argument("--out", required=True)
    p.add_argument("--ckpts", default=os.path.join(runner.REPO, ".cache", "cmp"))
    p.add_argument("--only", nargs="*", choices=sorted(CASES))
    p = sub.add_parser("compare")
    p.add_argument("a")
    p.add_argument("b")
    args = ap.parse_args()
    if args.command == "convert":
        convert(args.tree, args.ckpts, args.out, args.only or list(CASES))
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
