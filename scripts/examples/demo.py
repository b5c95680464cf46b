"""The built-in example, end to end, with real DeepSpeed on CPU:

1. train a tiny model at DP=2 (ZeRO-2, bf16) for 6 steps, saving a checkpoint after step 3;
   and, in the same job, a Universal checkpoint written from memory by ``uckpt.save_universal``;
2. convert that checkpoint with ``torchrun --nproc_per_node 2 -m uckpt convert``;
3. convert it with DeepSpeed's ``ds_to_universal.py`` too and compare the three outputs;
4. resume from uckpt's output at DP=3 with ``"checkpoint": {"load_universal": true}``;
5. print the losses before / after and a per-parameter check table. Exit 1 if a check fails.
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

from uckpt.tools.compare import compare_universal, load_state
from examples import runner

TIED_ALIAS = os.path.join("zero", "head.weight", "fp32.pt")


def step(msg):
    print(f"\n== {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(runner.REPO, "runs", "demo"))
    args = ap.parse_args(argv)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    native, ours, theirs = (os.path.join(work, p) for p in ("native", "uckpt/global_step3_universal",
                                                           "deepspeed/global_step3_universal"))

    step("1. train at DP=2 (ZeRO-2, bf16, torch Adam), save after step 3")
    t = time.time()
    injob = os.path.join(work, "injob")
    runner.train(2, "--zero-stage", "2", "--dtype", "bf16", "--steps", "6", "--save-at", "3", "--save-dir", native,
                 "--save-universal", injob, "--inject-missing-state", "--report", os.path.join(work, "original.json"))
    original = json.load(open(os.path.join(work, "original.json")))["losses"]
    tag = os.path.join(native, open(os.path.join(native, "latest")).read().strip())
    print(f"   saved {tag} ({time.time() - t:.1f}s)")
    injob_report = json.load(open(os.path.join(work, "original.json.injob.json")))
    print(f"   and, in the same job, uckpt.save_universal wrote {injob}/global_step3_universal from memory "
          f"({injob_report['in_job']['total_s']:.2f}s)")

    step("2. convert with: torchrun --nproc_per_node 2 -m uckpt convert --input_folder ... --output_folder ...")
    proc = runner.uckpt_convert(2, tag, ours, "--inject_missing_state")
    for line in proc.stdout.splitlines():
        if line.startswith("[uckpt]"):
            print("   " + line)

    step("3. convert with DeepSpeed's ds_to_universal.py and compare")
    runner.ds_to_universal(tag, theirs, "--inject_missing_state")
    diffs = compare_universal(ours, theirs, skip=lambda rel: rel == TIED_ALIAS)
    n_files = sum(len(f) for _, _, f in os.walk(os.path.join(ours, "zero")))
    print(f"   {n_files} files under zero/: {'identical' if not diffs else 'DIFFERENT'} "
          f"(tied alias head.weight: uckpt writes the fp32 master, DeepSpeed a bf16 cast)")
    for d in diffs[:10]:
        print("   DIFF " + d)
    injob_diffs = compare_universal(os.path.join(injob, "global_step3_universal"), ours)
    print(f"   the training job's own Universal checkpoint (no native save read): "
          f"{'identical to the converted one' if not injob_diffs else 'DIFFERENT'}")
    diffs += injob_diffs

    step("4. resume from uckpt's output at DP=3 with load_universal, train 3 more steps")
    runner.train(3, "--zero-stage", "2", "--dtype", "bf16", "--steps", "3", "--load-dir", os.path.dirname(ours),
                 "--dump-state", os.path.join(work, "resumed_state.pt"), "--report", os.path.join(work, "resumed.json"))
    resumed = json.load(open(os.path.join(work, "resumed.json")))
    state = torch.load(os.path.join(work, "resumed_state.pt"), weights_only=True)

    step("5. what happened")
    print(f"   {'step':>4} {'DP=2 original':>14} {'DP=3 resumed':>13}")
    for i, loss in enumerate(original):
        after = resumed["losses"][i - 3] if i >= 3 else None
        mark = "  <- checkpoint" if i == 2 else ""
        after_text = "" if after is None else f"{after:.5f}"
        print(f"   {i:>4} {loss:>14.5f} {after_text:>13}{mark}")
    ok = not diffs and resumed["start_step"] == 3
    close = all(abs(a - b) <= 2e-2 * abs(b) for a, b in zip(resumed["losses"], original[3:]))
    ok &= close
    print(f"\n   {'parameter':<17} {'shape':<9} {'fp32=DS':<8} {'fp32':<5} {'exp_avg':<8} {'exp_avg_sq':<11} step")
    for name, value in state["params"].items():
        row = [name, "x".join(map(str, value.shape))]
        ds_same = torch.equal(load_state(ours, name, "fp32")["param"], load_state(theirs, name, "fp32")["param"])
        row.append("yes" if ds_same else "NO")
        for key, st in (("params", "fp32"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            same = torch.equal(state[key][name], load_state(ours, name, st)["param"])
            ok &= same
            row.append("ok" if same else "DIFF")
        saved_step = load_state(ours, name, "step")
        row.append(f"{float(saved_step):g}")
        ok &= ds_same
        print(f"   {row[0]:<17} {row[1]:<9} {row[2]:<8} {row[3]:<5} {row[4]:<8} {row[5]:<11} {row[6]}")
    print(f"   restored optimizer step on every group: {sorted(set(state['step']))}; engine global_steps "
          f"{state['global_steps']}")
    print(f"   (fp32 / exp_avg / exp_avg_sq: 'ok' = the resumed DP=3 engine holds exactly the Universal values;"
          f" losses after the resume within 2% of the uninterrupted DP=2 run: {'yes' if close else 'NO'})")
    print(f"\nRESULT: {'PASS' if ok else 'FAIL'}  (files in {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
