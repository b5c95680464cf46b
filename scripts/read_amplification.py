"""Bytes each rank reads to resume from a Universal checkpoint: DeepSpeed's loader vs uckpt's.

Trains small models with real DeepSpeed on CPU, converts them with uckpt, then resumes each at a
target topology twice, with ``engine.load_checkpoint(load_universal=True)`` and with
``uckpt.load_into_engine``, and reports per rank the bytes read while loading (``rchar`` of
/proc/self/io: every byte requested through read(2)-family calls, page cache or not) against the
size of the Universal checkpoint. Results: a table on stdout and ``<workdir>/results.json``.

    .venv/bin/python scripts/read_amplification.py [--workdir runs/read_amp] [--hidden 256]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from examples import runner  # noqa: E402

CASES = [
    # name, trainer, save (nproc, args), resume (nproc, args)
    ("TP=2 -> TP=2 (ZeRO-1, DP=1)", "examples.autotp_train", (2, ("--tp", "2", "--zero-stage", "1")),
     (2, ("--tp", "2", "--zero-stage", "1"))),
    ("TP=2 -> TP=2 x DP=2 (ZeRO-2)", "examples.autotp_train", (2, ("--tp", "2", "--zero-stage", "1")),
     (4, ("--tp", "2", "--zero-stage", "2"))),
    ("EP=2 -> EP=2 (AutoEP, ZeRO-2, DP=2)", "examples.autoep_train", (2, ("--ep", "2", "--zero-stage", "2")),
     (2, ("--ep", "2", "--zero-stage", "2"))),
    ("DP=2 -> DP=3 (ZeRO-2, no TP)", "examples.tiny_train", (2, ("--zero-stage", "2")),
     (3, ("--zero-stage", "2"))),
]


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/read_amp")
    ap.add_argument("--hidden", type=int, default=256, help="model width of every trainer")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    for title, module, (save_n, save_args), (load_n, load_args) in CASES:
        key = f"{module.rsplit('.', 1)[1]}-{'-'.join(a.strip('-') for a in save_args)}"
        base = os.path.join(args.workdir, key)
        width = ("--hidden", str(args.hidden))
        native = os.path.join(base, "native")
        if not os.path.isdir(native):
            runner.train(save_n, *save_args, *width, "--steps", "2", "--save-dir", native, "--dtype", "bf16",
                         module=module)
        with open(os.path.join(native, "latest")) as f:
            tag = os.path.join(native, f.read().strip())
        universal = os.path.join(base, "universal", os.path.basename(tag) + "_universal")
        if not os.path.isdir(universal):
            runner.uckpt_convert(1, tag, universal, "--quiet", "--inject_missing_state")
        size = folder_bytes(universal)
        row = {"case": title, "universal_bytes": size, "ranks": load_n}
        for loader in ("deepspeed", "uckpt"):
            report = os.path.join(base, f"resume-{load_n}-{loader}.json")
            runner.train(load_n, *load_args, *width, "--dtype", "bf16", "--steps", "1", "--load-dir",
                         os.path.dirname(universal), "--loader", loader, "--report", report, module=module)
            per_rank = []
            for r in range(load_n):
                with open(f"{report}.load{r}.json") as f:
                    per_rank.append(json.load(f)["rchar"])
            row[loader] = {"per_rank": per_rank, "total": sum(per_rank), "x_checkpoint": sum(per_rank) / size}
        results.append(row)
        print(f"{title}: checkpoint {size / 2**20:.2f} MiB; read by all ranks: DeepSpeed "
              f"{row['deepspeed']['total'] / 2**20:.2f} MiB ({row['deepspeed']['x_checkpoint']:.2f}x), uckpt "
              f"{row['uckpt']['total'] / 2**20:.2f} MiB ({row['uckpt']['x_checkpoint']:.2f}x)", flush=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| case | checkpoint | DeepSpeed: bytes read, all ranks | uckpt: bytes read, all ranks |")
    print("|---|---|---|---|")
    for row in results:
        d, u = row["deepspeed"], row["uckpt"]
        print(f"| {row['case']} | {row['universal_bytes'] / 2**20:.2f} MiB | {d['total'] / 2**20:.2f} MiB = "
              f"{d['x_checkpoint']:.2f}x | {u['total'] / 2**20:.2f} MiB = {u['x_checkpoint']:.2f}x |")


if __name__ == "__main__":
    main()
