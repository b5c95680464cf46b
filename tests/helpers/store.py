"""Real DeepSpeed checkpoints (trained on CPU under torchrun), DeepSpeed's own Universal conversion of
each, uckpt's conversions and resumed runs, each built once per session and cached by configuration."""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from examples import runner


@dataclass(frozen=True)
class Ckpt:
    """A real checkpoint recipe: trained for ``steps`` steps, saved after ``save_at``."""

    nproc: int
    args: Tuple[str, ...]
    module: str = "examples.tiny_train"
    steps: int = 5
    save_at: int = 3
    # the same run also saves a Universal checkpoint from memory at save_at (uckpt.save_universal):
    # "blocking", or "background" (the live state is overwritten with NaN while it converts)
    injob: Optional[str] = None


CKPTS: Dict[str, Ckpt] = {
    # tied embedding/head, frozen layer, buffer, zero-size param, two param groups (all tiny_train models)
    "z2-bf16-dp4": Ckpt(4, ("--zero-stage", "2", "--dtype", "bf16"), injob="background"),
    "z1-bf16-dp2": Ckpt(2, ("--zero-stage", "1", "--dtype", "bf16"), injob="blocking"),
    "z2-fp32-dp3": Ckpt(3, ("--zero-stage", "2", "--dtype", "fp32"), injob="blocking"),  # uneven partitions
    "z3-bf16-dp2": Ckpt(2, ("--zero-stage", "3", "--dtype", "bf16"), injob="background"),
    "z3-fp32-dp3": Ckpt(3, ("--zero-stage", "3", "--dtype", "fp32"), injob="blocking"),  # uneven ZeRO-3
    # with a WarmupLR scheduler, whose state the load flags restore or not
    "z2-bf16-dp2-sched": Ckpt(2, ("--zero-stage", "2", "--dtype", "bf16", "--scheduler")),
    # pipeline (ZeRO-1, bf16, tied embedding across stages)
    "pp2-dp1": Ckpt(2, ("--stages", "2"), module="examples.pipe_train", steps=4, save_at=2),
    "pp2-dp2": Ckpt(4, ("--stages", "2"), module="examples.pipe_train", steps=4, save_at=2, injob="blocking"),
    # AutoTP: tiny random-weight Llama (GQA, vocabulary head, replicated norms; affine maps in UC info)
    "tp2-dp2-z2-bf16": Ckpt(4, ("--tp", "2", "--zero-stage", "2", "--dtype", "bf16"),
                            module="examples.autotp_train", steps=4, save_at=2, injob="blocking"),
    "tp2-dp1-z1-fp32": Ckpt(2, ("--tp", "2", "--zero-stage", "1", "--dtype", "fp32"),
                            module="examples.autotp_train", steps=3, save_at=2),
    "tp2-dp1-z3-bf16": Ckpt(2, ("--tp", "2", "--zero-stage", "3", "--dtype", "bf16"),
                            module="examples.autotp_train", steps=3, save_at=2, injob="background"),
    # AutoTP on a custom nn.Module split by a custom layer spec (column, fused 2-sub-parameter column, row, replicated)
    "tp2-custom-z2-fp32": Ckpt(2, ("--model", "custom", "--tp", "2", "--zero-stage", "2", "--dtype", "fp32"),
                               module="examples.autotp_train", steps=3, save_at=2),
    # TP=3: every split of the custom module is uneven (128 = 43 + 43 + 42), sub-parameter widths included
    "tp3-custom-z1-bf16": Ckpt(3, ("--model", "custom", "--tp", "3", "--zero-stage", "1", "--dtype", "bf16"),
                               module="examples.autotp_train", steps=3, save_at=2, injob="blocking"),
    # Llama with 8 heads / 4 kv heads, so it can resume at TP=4
    "tp2-llama8h-z1-bf16": Ckpt(2, ("--heads", "8", "--kv-heads", "4", "--tp", "2", "--zero-stage", "1", "--dtype",
                                    "bf16"), module="examples.autotp_train", steps=3, save_at=2),
    # AutoEP: tiny random-weight Mixtral, 8 experts over autoep_size 2 (per-expert files, expert param groups)
    "ep2-dp2-z2-bf16": Ckpt(2, ("--ep", "2", "--zero-stage", "2", "--dtype", "bf16"),
                            module="examples.autoep_train", steps=4, save_at=2, injob="background"),
    # DP=4 over EP=2: each EP rank's experts partitioned over 2 expert-data-parallel ranks
    "ep2-dp4-z1-fp32": Ckpt(4, ("--ep", "2", "--zero-stage", "1", "--dtype", "fp32"),
                            module="examples.autoep_train", steps=3, save_at=2, injob="blocking"),
    "ep2-dp4-z2-bf16-dbep": Ckpt(4, ("--ep", "2", "--zero-stage", "2", "--dtype", "bf16", "--data-before-ep"),
                                 module="examples.autoep_train", steps=3, save_at=2),
    # ZeRO-3, partition-native AutoEP (experts are ZeRO-3 params partitioned over expert-data-parallel ranks)
    "ep2-dp2-z3-bf16": Ckpt(2, ("--ep", "2", "--zero-stage", "3", "--dtype", "bf16"),
                            module="examples.autoep_train", steps=4, save_at=2),
    "ep2-dp4-z3-fp32": Ckpt(4, ("--ep", "2", "--zero-stage", "3", "--dtype", "fp32"),
                            module="examples.autoep_train", steps=3, save_at=2, injob="blocking"),
}


def _ds_workers(name: str) -> Tuple[str, ...]:
    """DeepSpeed's converter flags for ``name``. A pipeline checkpoint ties its embedding across
    stages, and every stage writes that parameter's temp fragments to the same paths: with DeepSpeed's
    worker pools the writes race and the run fails at random (a size mismatch or a torn zip). One
    worker each makes it deterministic (the last stage's fragments win, whole)."""
    if CKPTS[name].module == "examples.pipe_train":
        return ("--num_extract_workers", "1", "--num_merge_workers", "1")
    return ()


class Store:
    def __init__(self, root: str):
        self.root = root
        self._done: Dict[tuple, object] = {}

    def _once(self, key, build):
        if key not in self._done:
            self._done[key] = build()
        return self._done[key]

    def save_dir(self, name: str) -> str:
        def build():
            c = CKPTS[name]
            out = os.path.join(self.root, name, "native")
            injob = () if c.injob is None else ("--save-universal", os.path.join(self.root, name, "injob"),
                                                *(("--background", "--clobber-after-save")
                                                  if c.injob == "background" else ()),
                                                *(("--inject-missing-state",) if self.injects(name) else ()))
            runner.train(c.nproc, *c.args, "--steps", str(c.steps), "--save-at", str(c.save_at), "--save-dir", out,
                         "--report", os.path.join(self.root, name, "reference.json"), *injob, module=c.module)
            return out
        return self._once(("native", name), build)

    def tag(self, name: str) -> str:
        save = self.save_dir(name)
        with open(os.path.join(save, "latest")) as f:
            return os.path.join(save, f.read().strip())

    @staticmethod
    def injects(name: str) -> bool:
        """Whether ``name``'s Universal folders are compared with DeepSpeed's ``--inject_missing_state``
        conversion (the plain models) or its plain one (AutoTP / AutoEP, which write their own UC info)."""
        return CKPTS[name].module in ("examples.tiny_train", "examples.pipe_train")

    def injob_universal(self, name: str) -> str:
        """The Universal folder the training run of ``name`` saved from memory (``Ckpt.injob``)."""
        root = os.path.join(os.path.dirname(self.save_dir(name)), "injob")
        with open(os.path.join(root, "latest_universal")) as f:
            return os.path.join(root, f.read().strip())

    def reference_losses(self, name: str) -> List[float]:
        self.save_dir(name)
        with open(os.path.join(self.root, name, "reference.json")) as f:
            return json.load(f)["losses"]

    def ds_universal(self, name: str) -> str:
        """DeepSpeed's ds_to_universal output; its parent holds latest_universal."""
        def build():
            out = os.path.join(self.root, name, "ds", "universal")
            runner.ds_to_universal(self.tag(name), out, "--inject_missing_state", *_ds_workers(name))
            return out
        return self._once(("ds", name), build)

    def uckpt_universal(self, name: str, nproc: int, *extra: str) -> str:
        def build():
            out = os.path.join(self.root, name, f"uckpt-n{nproc}{'-'.join(extra).replace('-', '')}", "universal")
            runner.uckpt_convert(nproc, self.tag(name), out, "--inject_missing_state", "--quiet", *extra)
            return out
        return self._once(("uckpt", name, nproc, extra), build)

    def universal_pair(self, name: str, nproc: int):
        """uckpt's and DeepSpeed's conversions, both without --inject_missing_state (AutoTP writes UC info)."""
        def build():
            ours = os.path.join(self.root, name, f"uckpt-plain-n{nproc}", "universal")
            runner.uckpt_convert(nproc, self.tag(name), ours, "--quiet")
            theirs = os.path.join(self.root, name, "ds-plain", "universal")
            if not os.path.exists(theirs):
                runner.ds_to_universal(self.tag(name), theirs)
            return ours, theirs
        return self._once(("pair", name, nproc), build)

    def resume(self, name: str, universal: str, nproc: int, *args: str, steps: int = 2):
        """Resume from ``universal`` (via its parent's latest_universal) with load_universal; returns (state, report)."""
        def build():
            c = CKPTS[name]
            key = f"{os.path.basename(os.path.dirname(universal))}-n{nproc}{''.join(args)}"
            out = os.path.join(self.root, name, "resume", key)
            os.makedirs(out, exist_ok=True)
            runner.train(nproc, *(args or c.args), "--steps", str(steps), "--load-dir", os.path.dirname(universal),
                         "--dump-state", os.path.join(out, "state.pt"), "--report", os.path.join(out, "report.json"),
                         module=c.module)
            with open(os.path.join(out, "report.json")) as f:
                report = json.load(f)
            return torch.load(os.path.join(out, "state.pt"), weights_only=False), report
        return self._once(("resume", name, universal, nproc, args), build)

    def resumes(self, name: str, nproc: int, args: Tuple[str, ...], ours: str, theirs: Optional[str] = None,
                steps: int = 2) -> Dict[str, "Loaded"]:
        """Every resume of one target (``nproc`` ranks, trainer ``args`` or the checkpoint's own) in one job:
        DeepSpeed's loader on uckpt's Universal folder ``ours`` ("ds@ours") and uckpt's loader on it
        ("uckpt@ours"); with ``theirs`` (DeepSpeed's conversion, or another reference folder) the same two on
        it ("ds@theirs", "uckpt@theirs"). One job pays torchrun's and the imports' start-up once; tests of
        one target ask with the same folders, so they share it."""
        loads = [("ds@ours", ours, "deepspeed"), ("uckpt@ours", ours, "uckpt")]
        if theirs is not None:
            loads += [("ds@theirs", theirs, "deepspeed"), ("uckpt@theirs", theirs, "uckpt")]
        variants = [{"name": label, "loader": loader, "load_dir": os.path.dirname(universal)}
                    for label, universal, loader in loads]
        return self.load_variants(name, os.path.dirname(ours), nproc, tuple(args or CKPTS[name].args), variants,
                                  steps=steps)

    def load_variants(self, name: str, load_dir: str, nproc: int, args: Tuple[str, ...], variants: List[dict],
                      steps: int = 2) -> Dict[str, "Loaded"]:
        """One job of the trainer of ``name`` that loads each of ``variants`` (``--variants``: a name, the
        loader, DeepSpeed's load flags, trainer options, ``expect_error``) into a fresh engine in turn,
        dumps its state and trains ``steps`` steps. Returns each variant's state, losses and per-rank
        load records."""
        def build():
            key = f"variants-{len(self._done)}"
            out = os.path.join(self.root, name, key)
            os.makedirs(out, exist_ok=True)
            state, report = os.path.join(out, "state"), os.path.join(out, "report")
            runner.train(nproc, *args, "--steps", str(steps), "--load-dir", load_dir, "--dump-state", state,
                         "--report", report, "--variants", json.dumps(variants), module=CKPTS[name].module)
            results = {}
            for v in variants:
                n = v["name"]
                loads = [json.load(open(f"{report}.{n}.load{r}.json")) for r in range(nproc)] \
                    if v.get("load_dir", load_dir) else []
                failed = any("error" in info for info in loads)
                results[n] = Loaded(None if failed else torch.load(f"{state}.{n}", weights_only=False),
                                    None if failed else json.load(open(f"{report}.{n}"))["losses"], loads)
            return results
        return self._once(("variants", name, load_dir, nproc, args, json.dumps(variants)), build)


@dataclass
class Loaded:
    """One load of :meth:`Store.load_variants`: the dumped state and next losses (``None`` when the load
    failed as expected) and each rank's load record (report, client-state keys, error)."""

    state: Optional[dict]
    losses: Optional[List[float]]
    loads: List[dict]
