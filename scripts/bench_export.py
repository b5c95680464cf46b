#!/usr/bin/env python
"""Benchmark: uckpt export vs DeepSpeed's zero_to_fp32.py --safe_serialization, same run, same checkpoint.

Uses the benchmark's model (scripts/bench_convert.py's cases) with an untied head, built once with
real DeepSpeed (ZeRO-2 bf16 DP=4) and cached. Times, alternately (the order rotated each round), fp32 safetensors from the native
checkpoint by DeepSpeed's zero_to_fp32.py and by ``uckpt export`` on 1 and 2 ranks, and uckpt's export
from the Universal folder ``uckpt convert`` makes of it. Checks every run's tensors equal DeepSpeed's.

    python scripts/bench_export.py [--repeat 3] [--only large-tensors]
"""
import argparse
import glob
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_convert import CASES  # noqa: E402
from examples import runner  # noqa: E402


def build(case: str, root: str) -> str:
    """The benchmark case with an untied head: DeepSpeed's zero_to_fp32.py --safe_serialization refuses a
    tied model (safetensors: "Some tensors share memory"), so its row needs one without ties."""
    import hashlib

    args = [*CASES[case], "--no-tied"]
    key = hashlib.sha256(" ".join(args).encode()).hexdigest()[:10]
    return runner.cached_checkpoint(os.path.join(root, f"{case}-untied-{key}", "native"), 4,
                                    ["--zero-stage", "2", "--dtype", "bf16", "--steps", "1", *args],
                                    "examples.tiny_train")


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(path))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=sorted(CASES), default="large-tensors")
    ap.add_argument("--root", default=os.path.join(runner.REPO, ".cache", "bench"))
    args = ap.parse_args()
    tag = build(args.only, args.root)
    save_dir = os.path.dirname(tag)
    work = os.path.join(args.root, "export-out")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    universal = os.path.join(work, "universal")
    runner.uckpt_convert(1, tag, universal, "--quiet", "--inject_missing_state")
    py = [sys.executable, "-m"]
    tools = {
        "deepspeed zero_to_fp32 --safe_serialization": lambda out: py + [
            "deepspeed.utils.zero_to_fp32", save_dir, out, "--safe_serialization", "-t", os.path.basename(tag)],
        "uckpt export, native, 1 rank": lambda out: py + [
            "uckpt", "export", "--input_folder", tag, "--output_folder", out, "--dtype", "fp32", "--quiet"],
        "uckpt export, native, 2 ranks": lambda out: runner.torchrun_cmd(2, [
            "-m", "uckpt", "export", "--input_folder", tag, "--output_folder", out, "--dtype", "fp32", "--quiet"]),
        "uckpt export, Universal folder, 1 rank": lambda out: py + [
            "uckpt", "export", "--input_folder", universal, "--output_folder", out, "--dtype", "fp32", "--quiet"],
    }
    names = list(tools)
    times = {n: [] for n in names}
    for r in range(args.repeat):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out = os.path.join(work, f"{r}-{names.index(name)}")
            t0 = time.monotonic()
            runner.run(tools[name](out), timeout=3600)
            times[name].append(time.monotonic() - t0)
    reference = _tensors(os.path.join(work, f"0-{names.index(names[0])}"))
    for name in names[1:]:
        got = _tensors(os.path.join(work, f"0-{names.index(name)}"))
        same = set(got) <= set(reference) and all(got[k].equal(reference[k]) for k in got)
        left = sorted(set(reference) - set(got))  # tied aliases: DeepSpeed writes both names, uckpt one
        print(f"{name}: {len(got)} tensors {'equal to' if same else 'DIFFERENT from'} DeepSpeed's"
              + (f"; not stored (tied aliases): {', '.join(left)}" if left else ""))
    ds = statistics.median(times[names[0]])
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(work, "0-0", "*.safetensors")))
    print(f"{args.only}: {size / 2**20:.0f} MiB of fp32 safetensors, median of {args.repeat} round(s), "
          f"each run a new process (start-up included)")
    print("| tool | wall time | vs DeepSpeed |\n|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.2f} s | {t / ds:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
