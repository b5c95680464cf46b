#!/usr/bin/env python
"""What a 2-rank ``torchrun`` job costs before it converts anything: the floor under ``uckpt-2`` in
scripts/bench_convert.py.

Runs ``torchrun --nproc_per_node N`` on this file in worker mode (import torch.distributed, join a
gloo group, leave) and prints wall time and peak RSS summed over all its processes, measured as the
benchmark measures the converters.

    python scripts/launch_overhead.py [--nproc 2] [--repeat 3]
"""
import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def worker():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.dirname(HERE))
    from bench_convert import measure
    from examples import runner
    runs = [measure(runner.torchrun_cmd(args.nproc, [os.path.abspath(__file__), "--worker"]))
            for _ in range(args.repeat)]
    walls, rss, anon, _ = zip(*runs)
    print(f"torchrun, {args.nproc} workers that import torch.distributed and join a gloo group: "
          f"wall {statistics.median(walls):.2f} s (median of {args.repeat}: "
          f"{'/'.join(f'{w:.2f}' for w in walls)}), summed peak RSS {max(rss) / 2**20:.0f} MiB, "
          f"anonymous {max(anon) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
