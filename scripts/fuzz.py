#!/usr/bin/env python
"""Seeded fuzzing of the converter on damaged copies of real DeepSpeed checkpoints.

    python scripts/fuzz.py --cases 300 [--seed 1] [--timeout 120]

Each case copies a real checkpoint (trained once with DeepSpeed, cached under .cache/fuzz), applies
one seeded mutation (truncation, a bit flip in a pickle or in tensor bytes, a deleted or renamed key,
a value of the wrong type, a changed tensor shape or dtype, a changed DP or TP size, an extra or a
missing file), runs ``python -m uckpt convert`` on it and sorts the outcome:

* ``error``: exit != 0 with a one-line ``uckpt: error:`` message and no traceback, nothing published
  (no output, no partial folder, no ``latest_universal``) and the input unchanged;
* ``equal``: exit 0 and the output equals what DeepSpeed's ``ds_to_universal.py`` writes for the same
  mutated input (``compare_universal``; the tied alias as documented);
* ``other``: anything else (a traceback, a hang past the time bound, output where DeepSpeed fails or
  differs, a published or left-behind folder, a modified input). The campaign passes when it is 0.

The mutated inputs of ``other`` cases are kept under --work for a look.
"""
import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
from examples import runner  # noqa: E402

# real checkpoints the campaign damages: (trainer, ranks, arguments)
BASES = {
    "z2-bf16-dp2": ("examples.tiny_train", 2, ["--zero-stage", "2", "--dtype", "bf16", "--steps", "2"]),
    "z3-fp32-dp2": ("examples.tiny_train", 2, ["--zero-stage", "3", "--dtype", "fp32", "--steps", "2"]),
}
TIED_ALIAS = os.path.join("zero", "head.weight", "fp32.pt")  # README: uckpt writes the fp32 master there
ERROR_KINDS = [  # (kind, pattern of the message), first match wins
    ("damaged (CRC, zip)", r"CRC-32|is damaged"),
    ("dtype", r"not float32"),
    ("missing file", r"missing|does not exist|no \S+ files|is empty|has .*files for"),
    ("unreadable", r"cannot be read|truncated or corrupt|cannot be loaded safely|not a DeepSpeed|not a ZeRO"),
    ("wrong type", r": is (a|an) .*, not "),
    ("size or shape", r"storage record|elements|shape|lies outside"),
    ("inconsistent", r"differs|mixes|record|disagree|do not match|does not match"),
]


def base_tag(name: str, root: str) -> str:
    module, nproc, args = BASES[name]
    return runner.cached_checkpoint(os.path.join(root, name), nproc, args, module)


def fingerprint(folder: str):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --- mutations: each edits the copy ``tag`` in place and returns a one-line description -------------

def _files(tag):
    return sorted(f for f in os.listdir(tag) if f.endswith(".pt"))


def _flip(path, rng, pick):
    from uckpt.torchsave.zipfmt import record_spans

    name, (start, size) = rng.choice(sorted((n, s) for n, s in record_spans(path).items() if pick(n) and s[1]))
    at = start + rng.randrange(size)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ (1 << rng.randrange(8))]))
    return f"bit flip at byte {at} of record {name}"


def m_truncate(tag, rng):
    f = rng.choice(_files(tag))
    path = os.path.join(tag, f)
    size = rng.randrange(os.path.getsize(path))
    with open(path, "r+b") as fh:
        fh.truncate(size)
    return f"{f} truncated to {size} bytes"


def m_flip_pickle(tag, rng):
    f = rng.choice(_files(tag))
    return f"{f}: " + _flip(os.path.join(tag, f), rng, lambda n: n.endswith("data.pkl"))


def m_flip_tensor(tag, rng):
    f = rng.choice(_files(tag))
    return f"{f}: " + _flip(os.path.join(tag, f), rng, lambda n: "/data/" in n)


def _nodes(obj, path=(), depth=0):
    """(path, value) of every dict entry and list item, to depth 4."""
    if depth > 4:
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from _nodes(v, path + (k,), depth + 1)


def _edit(tag, rng, choose, change):
    """Load one file of ``tag`` (our own copy of a checkpoint we trained: trusted), change one node, save."""
    import torch

    f = rng.choice(_files(tag))
    path = os.path.join(tag, f)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    nodes = [(p, v) for p, v in _nodes(obj) if choose(v)]
    if not nodes:
        return None
    where, value = rng.choice(nodes)
    parent = obj
    for k in where[:-1]:
        parent = parent[k]
    what = change(parent, where[-1], value, rng)
    torch.save(obj, path)
    return f"{f}{''.join(f'[{k!r}]' for k in where)}: {what}"


def _delete(parent, key, value, rng):
    del parent[key]
    return "deleted"


def _rename(parent, key, value, rng):
    if not isinstance(parent, dict):
        return _delete(parent, key, value, rng)
    parent[f"{key}_renamed" if isinstance(key, str) else key + 1000] = parent.pop(key)
    return "renamed"


def _retype(parent, key, value, rng):
    parent[key] = rng.choice(["oops", 7, None, [1, 2], 2.5, {"x": 1}])
    return f"replaced by {parent[key]!r}"


def _reshape(parent, key, value, rng):
    n = value.numel()
    parent[key] = value.reshape(-1)[: max(0, n - rng.randrange(1, 5))] if rng.random() < 0.5 or n < 2 \
        else value.reshape(-1).repeat(2)
    return f"tensor of {n} elements now {parent[key].numel()}"


def _retype_tensor(parent, key, value, rng):
    import torch

    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32])
    parent[key] = value.to(dtype)
    return f"tensor {value.dtype} now {dtype}"


def _is_tensor(v):
    import torch
    return torch.is_tensor(v)


def m_delete_key(tag, rng):
    return _edit(tag, rng, lambda v: True, _delete)


def m_rename_key(tag, rng):
    return _edit(tag, rng, lambda v: True, _rename)


def m_wrong_type(tag, rng):
    return _edit(tag, rng, lambda v: True, _retype)


def m_shape(tag, rng):
    return _edit(tag, rng, _is_tensor, _reshape)


def m_dtype(tag, rng):
    return _edit(tag, rng, _is_tensor, _retype_tensor)


def m_dp_size(tag, rng):
    """Drop the last DP rank's files, or add a copy as a rank beyond the last."""
    optims = [f for f in _files(tag) if "optim_states" in f]
    ranks = sorted({int(re.search(r"zero_pp_rank_(\d+)_", f).group(1)) for f in optims})
    if rng.random() < 0.5:
        gone = [f for f in _files(tag) if f"zero_pp_rank_{ranks[-1]}_" in f]
        for f in gone:
            os.remove(os.path.join(tag, f))
        return f"removed DP rank {ranks[-1]} ({', '.join(gone)})"
    made = []
    for f in [f for f in _files(tag) if f"zero_pp_rank_{ranks[-1]}_" in f]:
        new = f.replace(f"zero_pp_rank_{ranks[-1]}_", f"zero_pp_rank_{ranks[-1] + 1}_")
        shutil.copy(os.path.join(tag, f), os.path.join(tag, new))
        made.append(new)
    return f"added DP rank {ranks[-1] + 1} ({', '.join(made)})"


def m_tp_size(tag, rng):
    """Every file of model-parallel rank 00 copied as rank 01: a TP size the metadata does not record."""
    made = []
    for f in _files(tag):
        if "mp_rank_00" in f:
            shutil.copy(os.path.join(tag, f), os.path.join(tag, f.replace("mp_rank_00", "mp_rank_01")))
            made.append(f.replace("mp_rank_00", "mp_rank_01"))
    return f"added mp rank 01 ({len(made)} files)"


def m_extra_file(tag, rng):
    name = rng.choice(["zero_pp_rank_9_mp_rank_00_optim_states.pt", "junk.pt", "layer_00-model_states.pt",
                       "mp_rank_07_model_states.pt"])
    with open(os.path.join(tag, name), "wb") as f:
        f.write(os.urandom(rng.randrange(0, 4096)))
    return f"extra file {name}"


def m_missing_file(tag, rng):
    f = rng.choice(_files(tag))
    os.remove(os.path.join(tag, f))
    return f"removed {f}"


MUTATIONS = [m_truncate, m_flip_pickle, m_flip_tensor, m_delete_key, m_rename_key, m_wrong_type, m_shape,
             m_dtype, m_dp_size, m_tp_size, m_extra_file, m_missing_file]


# --- one case -------------------------------------------------------------------------------------

def _kind(message: str) -> str:
    for kind, pattern in ERROR_KINDS:
        if re.search(pattern, message):
            return kind
    return "other error"


def run_case(base: str, case: int, seed: int, work: str, timeout: float):
    """Returns (outcome, detail): outcome is "error: <kind>", "equal" or "other: <why>"."""
    from uckpt.tools.compare import compare_universal

    rng = random.Random(f"{seed}-{case}")
    root = os.path.join(work, f"case{case:04d}")
    shutil.rmtree(root, ignore_errors=True)
    tag = os.path.join(root, "in", os.path.basename(base))
    shutil.copytree(base, tag)
    mutation = rng.choice(MUTATIONS)
    what = mutation(tag, rng) or m_truncate(tag, rng)
    before = fingerprint(tag)
    out = os.path.join(root, "out", "universal")
    cmd = [sys.executable, "-m", "uckpt", "convert", "--input_folder", tag, "--output_folder", out,
           "--inject_missing_state", "--quiet"]
    try:
        proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "other: timeout", what
    published = os.path.exists(out) or any(n.startswith("universal.uckpt-partial") for n in os.listdir(os.path.dirname(out))) \
        if os.path.isdir(os.path.dirname(out)) else False
    if fingerprint(tag) != before:
        return "other: input modified", what
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if "Traceback" in proc.stderr or not lines or not lines[-1].startswith("uckpt: error:"):
            return "other: not a one-line error", f"{what} -> {proc.stderr.strip()[-300:]}"
        if published or os.path.exists(os.path.join(os.path.dirname(out), "latest_universal")):
            return "other: output left after an error", what
        shutil.rmtree(root, ignore_errors=True)
        return f"error: {_kind(lines[-1])}", f"{what} -> {lines[-1][:200]}"
    theirs = os.path.join(root, "ds", "universal")
    try:
        ds = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag,
                             "--output_folder", theirs, "--inject_missing_state"], cwd=runner.REPO, env=runner.env(),
                            capture_output=True, text=True, timeout=max(timeout, 300))
    except subprocess.TimeoutExpired:
        return "other: uckpt converted, DeepSpeed hung", what
    if ds.returncode != 0:
        return "other: uckpt converted, DeepSpeed failed", f"{what} -> {ds.stdout.strip()[-200:]}"
    diff = compare_universal(out, theirs, skip=lambda rel: rel == TIED_ALIAS)
    if diff:
        return "other: output differs from DeepSpeed's", f"{what} -> {diff[:3]}"
    shutil.rmtree(root, ignore_errors=True)
    return "equal", what


def campaign(bases, cases: int, seed: int, work: str, timeout: float, log=print):
    counts = collections.Counter()
    others = []
    for case in range(cases):
        base = bases[case % len(bases)]
        t0 = time.monotonic()
        outcome, detail = run_case(base, case, seed, work, timeout)
        counts[outcome] += 1
        if outcome.startswith("other"):
            others.append((case, outcome, detail))
        log(f"case {case:4d} {os.path.basename(os.path.dirname(os.path.dirname(base)))[:14]:14s} "
            f"{outcome:38s} {time.monotonic() - t0:5.1f}s  {detail[:150]}")
    return counts, others


def table(counts, cases: int) -> str:
    errors = sum(v for k, v in counts.items() if k.startswith("error"))
    other = sum(v for k, v in counts.items() if k.startswith("other"))
    lines = [f"cases: {cases}", f"one-line errors: {errors}"]
    lines += [f"  {k[len('error: '):]}: {v}" for k, v in sorted(counts.items()) if k.startswith("error")]
    lines += [f"equal to ds_to_universal.py: {counts['equal']}", f"anything else: {other}"]
    lines += [f"  {k[len('other: '):]}: {v}" for k, v in sorted(counts.items()) if k.startswith("other")]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120, help="seconds one conversion may take")
    ap.add_argument("--root", default=os.path.join(runner.REPO, ".cache", "fuzz"), help="the real checkpoints")
    ap.add_argument("--work", default=os.path.join(runner.REPO, "runs", "fuzz"))
    ap.add_argument("--json", help="write the counts and the 'other' cases here")
    args = ap.parse_args()
    bases = [base_tag(name, args.root) for name in BASES]
    counts, others = campaign(bases, args.cases, args.seed, args.work, args.timeout,
                              log=lambda line: print(line, flush=True))
    print(table(counts, args.cases))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": counts, "others": others}, f, indent=2)
    return 1 if others else 0


if __name__ == "__main__":
    sys.exit(main())
