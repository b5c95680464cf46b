#!/usr/bin/env python
"""Benchmark: loading a Universal checkpoint into a DeepSpeed engine at another DP size,
``uckpt.load_into_engine`` against DeepSpeed's ``engine.load_checkpoint`` with ``load_universal``.

The large case of scripts/bench_convert.py (218 M parameters, ZeRO-2 bf16, 2.7 GB saved at DP=4,
and the same model saved at DP=2), each converted once by uckpt (untimed), is loaded by a 2-rank
torchrun job of the example trainer (DP 4 -> 2 and 2 -> 2). The two loaders alternate, each run
starts cold (page cache dropped, so the Universal files come from disk), and each rank records,
around the load call alone (not the engine's start-up): wall time, bytes read (``rchar``: every
read(2)-family byte, cached or not), the optimizer state it keeps (fp32 partition and both moments),
and the anonymous memory the load added at its peak. After each pair both engines' states are
compared value by value (``--dump-state``), so the faster loader is also a correct one.

    python scripts/bench_load.py [--repeat 3]
"""
import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from bench_convert import CASES, build, drop_caches  # noqa: E402
from examples import runner  # noqa: E402

CASE = "zero2-3gb"
MODEL = [a for a in CASES[CASE]]
# each loader's trainer flags: DeepSpeed's, uckpt's (4 reader threads, the default) and uckpt's on one thread
LOADERS = {"deepspeed": ("--loader", "deepspeed"), "uckpt": ("--loader", "uckpt"),
           "uckpt-1-thread": ("--loader", "uckpt", "--load-threads", "1")}


def universal_of(root: str, dp: int) -> str:
    """The large case saved at ``dp`` ranks and converted by uckpt (both built once, cached)."""
    if dp == 4:
        tag = build(CASE, root)
    else:
        tag = runner.cached_checkpoint(os.path.join(root, f"{CASE}-dp{dp}", "native"), dp,
                                       ["--zero-stage", "2", "--dtype", "bf16", "--steps", "1", *MODEL],
                                       "examples.tiny_train")
    out = os.path.join(os.path.dirname(os.path.dirname(tag)), "universal-for-load", os.path.basename(tag) + "_universal")
    if not os.path.exists(os.path.join(os.path.dirname(out), "latest_universal")):
        runner.uckpt_convert(1, tag, out, "--inject_missing_state", "--quiet")
    return os.path.dirname(out)


def load_once(load_dir: str, loader: str, work: str, nproc: int = 2):
    """One cold 2-rank load; each rank's record, and the state dump of rank 0."""
    drop_caches([load_dir])
    report = os.path.join(work, f"{loader}-report")
    state = os.path.join(work, f"{loader}-state.pt")
    runner.train(nproc, "--zero-stage", "2", "--dtype", "bf16", *MODEL, "--steps", "1", "--load-dir", load_dir,
                 *LOADERS[loader], "--report", report, "--dump-state", state, module="examples.tiny_train",
                 timeout=1800)
    ranks = [json.load(open(f"{report}.load{r}.json")) for r in range(nproc)]
    return ranks, state


def same_state(a: str, b: str) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return all(torch.equal(x[k][n], y[k][n]) for k in ("params", "exp_avg", "exp_avg_sq") for n in x[k]) \
        and x["step"] == y["step"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--root", default=os.path.join(runner.REPO, ".cache", "bench"))
    ap.add_argument("--json", default=os.path.join(runner.REPO, "runs", "bench", "load.json"))
    args = ap.parse_args()
    results = {}
    work = os.path.join(args.root, "load-work")
    os.makedirs(work, exist_ok=True)
    for src in (4, 2):
        load_dir = universal_of(args.root, src)
        runs = {loader: [] for loader in LOADERS}
        for i in range(args.repeat):
            states = {}
            for loader in (list(LOADERS) if i % 2 == 0 else list(LOADERS)[::-1]):
                ranks, states[loader] = load_once(load_dir, loader, work)
                runs[loader].append({"load_s": max(r["load_s"] for r in ranks),
                                     "rchar": sum(r["rchar"] for r in ranks),
                                     "kept": sum(r["kept_bytes"] for r in ranks),
                                     "peak_added_mib": sum(r["peak_added_mib"] for r in ranks)})
            for loader in LOADERS:
                assert same_state(states["deepspeed"], states[loader]), f"DP {src} -> 2: {loader}'s state differs"
        row = {}
        for loader, rs in runs.items():
            row[loader] = {"load_s": statistics.median(r["load_s"] for r in rs),
                           "read_gb": statistics.median(r["rchar"] for r in rs) / 1e9,
                           "kept_gb": rs[0]["kept"] / 1e9,
                           "peak_added_mib": max(r["peak_added_mib"] for r in rs), "runs": rs}
        results[f"dp{src}->2"] = row
        print_row(f"DP {src} -> 2", row, args.repeat)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


def print_row(title, row, repeat):
    ds = row["deepspeed"]
    print(f"\n{title}: {CASE}, 2 ranks, cold cache, median of {repeat} (load call only, slowest rank)")
    print("| loader | load s | vs DS | read GB (sum) | read / kept | peak added MiB (sum) | vs DS |")
    print("|---|---|---|---|---|---|---|")
    for loader, r in row.items():
        print(f"| {loader} | {r['load_s']:.2f} | {r['load_s'] / ds['load_s']:.2f} | {r['read_gb']:.2f} | "
              f"{r['read_gb'] / r['kept_gb']:.2f} | {r['peak_added_mib']:.0f} | "
              f"{r['peak_added_mib'] / ds['peak_added_mib']:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
