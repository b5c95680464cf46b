#!/usr/bin/env python
"""Benchmark: uckpt convert vs DeepSpeed's ds_to_universal.py on real ZeRO-2 bf16 DP=4 checkpoints.

Builds (once, cached under .cache/bench/) two checkpoints with real DeepSpeed on CPU:
  small-tensors: hundreds of layers of tiny tensors;
  large-tensors: a few large layers (hundreds of MB of optimizer state);
  xl-tensors: a few larger layers (about 1 GB of optimizer state).
Runs ds_to_universal.py (its default workers) and uckpt with 1 and 2 ranks alternately, --repeat
times each (the order rotated each round), and prints median wall time, peak memory summed over all processes of the run
(RSS, and anonymous RSS which excludes mapped file pages), and temporary bytes written.
Temporary bytes: DeepSpeed's temp folder, measured in one extra run with --keep_temp_folder;
for uckpt, every byte its ranks report writing minus the bytes of the final output.

    python scripts/bench_convert.py [--repeat 3] [--only small-tensors]
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from uckpt.compare import compare_universal  # noqa: E402
from uckpt.examples import runner  # noqa: E402

CASES = {
    "small-tensors": ["--layers", "800", "--hidden", "64", "--vocab", "64"],
    "large-tensors": ["--layers", "6", "--hidden", "2048", "--vocab", "256"],
    # beyond the two cases the issue names: where data, not process start-up, dominates
    "xl-tensors": ["--layers", "8", "--hidden", "3072", "--vocab", "256"],
}
TIED_ALIAS = os.path.join("zero", "head.weight", "fp32.pt")


def build(case: str, root: str) -> str:
    key = hashlib.sha256(" ".join(CASES[case]).encode()).hexdigest()[:10]  # cached by configuration
    save = os.path.join(root, f"{case}-{key}", "native")
    latest = os.path.join(save, "latest")
    if not os.path.exists(latest):
        shutil.rmtree(save, ignore_errors=True)
        print(f"building {case} checkpoint (DeepSpeed ZeRO-2 bf16, DP=4) ...", flush=True)
        runner.train(4, "--zero-stage", "2", "--dtype", "bf16", "--steps", "1", "--save-dir", save, *CASES[case],
                     timeout=3600)
    with open(latest) as f:
        return os.path.join(save, f.read().strip())


def _tree_memory(proc: psutil.Process):
    rss = anon = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            with open(f"/proc/{p.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            rss += int(fields["VmRSS"].split()[0]) * 1024
            anon += int(fields["RssAnon"].split()[0]) * 1024
        except (FileNotFoundError, ProcessLookupError, KeyError, psutil.NoSuchProcess):
            pass
    return rss, anon


def measure(cmd):
    """Run ``cmd``; return (wall seconds, peak summed RSS, peak summed anonymous RSS)."""
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, cwd=runner.REPO, env=runner.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = psutil.Process(popen.pid)
    peak = [0, 0]
    out = []
    reader = threading.Thread(target=lambda: out.append(popen.stdout.read()), daemon=True)
    reader.start()
    while popen.poll() is None:
        rss, anon = _tree_memory(proc)
        peak = [max(peak[0], rss), max(peak[1], anon)]
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    reader.join()
    if popen.returncode != 0:
        raise runner.JobError(cmd, popen.returncode, (out[0] if out else b"").decode(errors="replace"))
    return wall, peak[0], peak[1]


def settle():
    """Flush dirty pages and give the disk a moment after deleting the previous output.

    On the ext4 (discard) VM disk of this machine, file creation right after deleting thousands
    of files runs several times slower; settling first treats every tool alike.
    """
    subprocess.run(["sync"], check=False)
    time.sleep(2)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(folder) for n in ns)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=sorted(CASES))
    ap.add_argument("--root", default=os.path.join(runner.REPO, ".cache", "bench"))
    ap.add_argument("--json", default=os.path.join(runner.REPO, "runs", "bench", "results.json"))
    args = ap.parse_args()
    results = {}
    for case in [args.only] if args.only else list(CASES):
        tag = build(case, args.root)
        work = os.path.join(os.path.dirname(os.path.dirname(tag)), "out")
        in_bytes = folder_bytes(tag)
        tools = {
            "deepspeed": lambda out: [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                      tag, "--output_folder", out, "--inject_missing_state"],
            "uckpt-1": lambda out: [sys.executable, "-m", "uckpt", "convert", "--input_folder", tag, "--output_folder",
                                    out, "--inject_missing_state", "--quiet"],
            "uckpt-1-256MB": lambda out: [sys.executable, "-m", "uckpt", "convert", "--input_folder", tag,
                                          "--output_folder", out, "--inject_missing_state", "--quiet",
                                          "--memory_budget_mb", "256"],
            "uckpt-2": lambda out: runner.torchrun_cmd(2, ["-m", "uckpt", "convert", "--input_folder", tag,
                                                           "--output_folder", out, "--inject_missing_state", "--quiet"]),
        }
        shutil.rmtree(work, ignore_errors=True)  # left by an interrupted benchmark
        runs = {t: [] for t in tools}
        names = list(tools)
        timed, kept = os.path.join(work, "timed"), os.path.join(work, "kept")
        for i in range(args.repeat):
            # rotate the order each round: a run right after another tool's output was deleted (and
            # after DeepSpeed removed its temp folder) meets a slower disk here, so no tool always goes second
            for tool in names[i % len(names):] + names[:i % len(names)]:
                shutil.rmtree(timed, ignore_errors=True)
                settle()
                out = os.path.join(timed, tool, "universal")
                runs[tool].append(measure(tools[tool](out)))
                if i == args.repeat - 1 and tool != "deepspeed":  # checked after the timed runs
                    os.makedirs(os.path.join(kept, tool))
                    os.rename(out, os.path.join(kept, tool, "universal"))
        ref = os.path.join(work, "ref", "universal")
        runner.ds_to_universal(tag, ref, "--inject_missing_state")
        for tool in names[1:]:
            out = os.path.join(kept, tool, "universal")
            diffs = compare_universal(out, ref, skip=lambda rel: rel == TIED_ALIAS)
            assert not diffs, (tool, diffs[:5])
            report = json.load(open(os.path.join(out, "uckpt_report.json")))
            written = sum(r["written_bytes"] for r in report["ranks"])
            runs[tool + ":temp"] = written - (folder_bytes(out) - os.path.getsize(
                os.path.join(out, "uckpt_report.json")))
        shutil.rmtree(work, ignore_errors=True)
        keep = os.path.join(work, "keep", "universal")
        runner.ds_to_universal(tag, keep, "--inject_missing_state", "--keep_temp_folder")
        runs["deepspeed:temp"] = folder_bytes(os.path.join(keep, "tmp"))
        shutil.rmtree(work, ignore_errors=True)
        row = {}
        for tool in tools:
            walls, rss, anon = zip(*runs[tool])
            row[tool] = {"wall_s": statistics.median(walls), "peak_rss_mib": max(rss) / 2**20,
                         "peak_anon_mib": max(anon) / 2**20, "temp_mib": runs[tool + ":temp"] / 2**20,
                         "walls": walls}
        results[case] = {"input_mib": in_bytes / 2**20, "tools": row}
        print_case(case, results[case], args.repeat)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


def print_case(case, res, repeat):
    ds = res["tools"]["deepspeed"]
    print(f"\n{case}: input {res['input_mib']:.1f} MiB, median of {repeat} runs, 2-core CPU machine")
    print("| tool | wall s | vs DS | peak RSS MiB (sum) | vs DS | peak anon MiB (sum) | vs DS | temp MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for tool, r in res["tools"].items():
        print(f"| {tool} | {r['wall_s']:.2f} | {r['wall_s'] / ds['wall_s']:.2f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] / ds['peak_rss_mib']:.2f} | {r['peak_anon_mib']:.0f} | "
              f"{r['peak_anon_mib'] / ds['peak_anon_mib']:.2f} | {r['temp_mib']:.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
