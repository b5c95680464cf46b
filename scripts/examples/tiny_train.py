"""Train a tiny model with real DeepSpeed, save a ZeRO checkpoint, or resume from a Universal one.

Launched with ``torchrun`` (any world size; on CPU set ``DS_ACCELERATOR=cpu``). The global batch
is fixed (``--global-batch``) and split evenly over the data-parallel ranks, so the loss of a step
does not depend on the world size: a run resumed at another DP size continues the same curve.

The model deliberately holds every parameter kind a converter must handle: two optimizer param
groups (decay / no decay), a tied embedding / output head, a frozen layer, a persistent buffer
and a zero-sized parameter.

``--dump-state FILE`` writes, right after start-up (and after ``--load-dir`` when given), every
trainable parameter's full fp32 master copy, Adam moments and step, gathered with DeepSpeed's
own ``safe_get_full_*`` helpers, so tests can compare two resumed engines value by value.
"""
import argparse
import json
import os
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


class TinyLM(nn.Module):
    """Embedding -> N residual MLP blocks -> LayerNorm -> tied head."""

    def __init__(self, vocab: int, hidden: int, layers: int, tied: bool = True, extras: bool = True,
                 empty: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.extras = extras
        if extras:
            self.frozen = nn.Linear(hidden, hidden)
            self.frozen.requires_grad_(False)
            self.register_buffer("gain", torch.linspace(0.5, 1.5, hidden))
            if empty:
                self.empty = nn.Parameter(torch.zeros(0))
        nn.init.normal_(self.embed.weight, std=0.1)  # tied head: keep the first logits (and loss) sane

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.extras:
            x = x + 0.1 * self.frozen(x) * self.gain.to(x.dtype)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(self.norm(x))


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch(step: int, global_batch: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (global_batch, seq + 1), generator=g)


def ds_config(args, world: int) -> dict:
    cfg = {
        "train_batch_size": args.global_batch,
        "train_micro_batch_size_per_gpu": args.global_batch // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "Adam", "params": {"torch_adam": True, "lr": args.lr, "weight_decay": 0.1}},
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if args.scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                                                           "warmup_num_steps": 8}}
    if args.load_dir and args.loader != "uckpt":
        cfg["checkpoint"] = {"load_universal": args.load_universal}
    return cfg


def dump_state(engine, path: str):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": None}
    # a fresh optimizer (or one a weights-only load left alone) holds no moments before its first step;
    # the gathers are collectives, so every rank must agree to skip them
    held = torch.tensor([float(all("exp_avg" in st for st in engine.optimizer.optimizer.state.values())
                               and len(engine.optimizer.optimizer.state) > 0)])
    dist.all_reduce(held, op=dist.ReduceOp.MIN)
    with_moments = bool(held.item())
    for name, p in engine.module.named_parameters():
        if not p.requires_grad or p.numel() == 0 and not hasattr(p, "ds_numel"):
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:
            continue
        out["params"][name] = full.detach().clone().cpu()
        for key in ("exp_avg", "exp_avg_sq") if with_moments else ():
            s = safe_get_full_optimizer_state(p, key)
            if s is not None:
                out[key][name] = s.detach().clone().cpu()
    out["frozen"], out["buffers"] = {}, {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            if hasattr(p, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    out["frozen"][name] = p.detach().clone().cpu()
            else:
                out["frozen"][name] = p.detach().clone().cpu()
    for name, b in engine.module.named_buffers():
        out["buffers"][name] = b.detach().clone().cpu()
    out["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.optimizer.param_groups]
    steps = []
    for st in engine.optimizer.optimizer.state.values():
        if "step" in st:
            steps.append(float(st["step"]))
    out["step"] = steps
    out["global_steps"] = engine.global_steps
    out["lr_scheduler"] = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    if dist.get_rank() == 0:
        torch.save(out, path)


class PeakRSS:
    """Memory this process holds beyond what it held at start, at its highest: the kernel's peak RSS
    (VmHWM), reset at start through /proc/self/clear_refs, less the RSS then; where the reset is not
    allowed, anonymous RSS sampled every 5 ms on a thread (which can miss a short spike)."""

    def __init__(self):
        self.base = _status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.exact = True
        except OSError:
            self.exact = False
        self.peak = self.base
        self._done = threading.Event()
        self._thread = None if self.exact else threading.Thread(target=self._sample, daemon=True)
        if self._thread is not None:
            self._thread.start()

    def _sample(self):
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _status("VmRSS"))

    def stop(self) -> int:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        return (_status("VmHWM") if self.exact else max(self.peak, _status("VmRSS"))) - self.base


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return 0


def _kept_bytes(engine) -> Optional[int]:
    """Bytes a load must give this rank, as the Universal files hold them (fp32): its partition of the
    master weights and of both Adam moments, and the whole of each frozen parameter and buffer."""
    groups = getattr(engine.optimizer, "single_partition_of_fp32_groups", None) \
        or getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if not groups:
        return None
    extras = [p for p in engine.module.parameters() if not p.requires_grad] + list(engine.module.buffers())
    return 3 * 4 * sum(t.numel() for t in groups) + 4 * sum(t.numel() for t in extras)


def _rchar() -> int:
    """Bytes this process has read through read(2)-family calls (Linux /proc/self/io), else 0."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return 0


LOAD_FLAGS = ("load_module_strict", "load_optimizer_states", "load_lr_scheduler_states", "load_module_only")


def load(engine, args):
    """Resume with DeepSpeed's own loader, uckpt's rank-aware one, or DeepSpeed's method routed to uckpt's
    by ``uckpt.use_for_universal_loads`` (``hook``), with ``args``' DeepSpeed load flags (the example
    trainers share this). With ``--report``, each rank writes ``<report>.load<rank>.json``: bytes it
    read while loading, uckpt's report and the client state's keys and types; with ``--expect-error``
    a failed load is recorded there (type, message) instead of raised."""
    before = _rchar()
    info = {"loader": args.loader}
    flags = {k: getattr(args, k) for k in LOAD_FLAGS}
    peak = PeakRSS()
    t0 = time.perf_counter()
    try:
        if args.loader == "uckpt":
            import uckpt

            threads = getattr(args, "load_threads", None)
            result = uckpt.load_into_engine(engine, args.load_dir, tag=args.load_tag,
                                            trust_checkpoint=getattr(args, "trust_checkpoint", False), **flags,
                                            **({} if threads is None else {"threads": threads}))
            load_path, client = result  # unpacks as DeepSpeed's (load_path, client_state)
            engine.uckpt_load_report = result.report
        else:
            import uckpt

            # routing is process-wide: a "hook" load earlier in this job must not route this one
            uckpt.use_for_universal_loads(args.loader == "hook")
            load_path, client = engine.load_checkpoint(args.load_dir, tag=args.load_tag, **flags)
    except Exception as exc:  # noqa: BLE001 - recorded for the test, which checks type and message
        if not getattr(args, "expect_error", False):
            raise
        info.update(error_type=[c.__name__ for c in type(exc).__mro__], error=str(exc))
        _write_load_info(args, info)
        return False
    info["load_s"] = time.perf_counter() - t0
    info["peak_added_mib"] = peak.stop() / 2**20  # RSS, file pages included
    info["kept_bytes"] = _kept_bytes(engine)
    info["load_path"] = load_path
    info.update(getattr(engine, "uckpt_load_report", None) or {})
    info["client_types"] = {k: f"{type(v).__module__}.{type(v).__qualname__}" for k, v in (client or {}).items()}
    info["rchar"] = _rchar() - before
    _write_load_info(args, info)
    return True


def _write_load_info(args, info):
    if args.report:
        with open(args.report + f".load{dist.get_rank()}.json", "w") as f:
            json.dump(info, f)


def add_job_args(ap):
    """The save / resume / report options every example trainer takes."""
    ap.add_argument("--save-dir", help="save a native checkpoint here")
    ap.add_argument("--save-at", type=int, default=None, help="save after this many steps (default: at the end)")
    ap.add_argument("--load-dir", help="resume from this folder (Universal) before training")
    ap.add_argument("--load-tag", default=None)
    ap.add_argument("--loader", choices=["deepspeed", "uckpt", "hook"], default="deepspeed",
                    help="resume with engine.load_checkpoint (deepspeed), uckpt.load_into_engine (uckpt), or "
                         "engine.load_checkpoint after uckpt.use_for_universal_loads() (hook)")
    ap.add_argument("--load-threads", type=int, default=None, help="with --loader uckpt: its reader threads")
    ap.add_argument("--no-load-module-strict", dest="load_module_strict", action="store_false")
    ap.add_argument("--no-load-optimizer-states", dest="load_optimizer_states", action="store_false")
    ap.add_argument("--no-load-lr-scheduler-states", dest="load_lr_scheduler_states", action="store_false")
    ap.add_argument("--load-module-only", action="store_true")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="with --loader uckpt: unpickle the client state fully (UNSAFE on files from elsewhere)")
    ap.add_argument("--dump-state", help="write full fp32/moments/step after start-up (rank 0)")
    ap.add_argument("--report", help="write a JSON report of the losses (rank 0)")
    ap.add_argument("--save-universal", help="also save a Universal checkpoint from memory (uckpt.save_universal) "
                                             "into this folder, when a native save is due")
    ap.add_argument("--background", action="store_true", help="--save-universal without blocking (waited for at "
                                                               "the end)")
    ap.add_argument("--inject-missing-state", action="store_true", help="--save-universal: the converter's option")
    ap.add_argument("--save-universal-on-signal", metavar="SIGNAL",
                    help="on this signal (e.g. USR1), save a Universal checkpoint into --save-universal at the next "
                         "step boundary and stop")
    ap.add_argument("--signal-self-at", type=int, default=None,
                    help="test of --save-universal-on-signal: rank 0 sends itself the signal as this step starts")
    ap.add_argument("--clobber-after-save", action="store_true",
                    help="test of --background: overwrite the live state with NaN right after the call, before "
                         "the save converts anything (restored after it finishes)")
    ap.add_argument("--variants", help="JSON list of loads run one after another in this job, each on a fresh "
                                       "engine: {\"name\", \"loader\", DeepSpeed's load flags, \"expect_error\", "
                                       "trainer options}; each writes <dump-state>.<name> and <report>.<name>[...]")


def variants(args):
    """``args`` for each load of ``--variants`` (one job, many fresh engines: start-up paid once), else
    ``[args]``."""
    import copy

    if not args.variants:
        return [args]
    out = []
    for spec in json.loads(args.variants):
        v = copy.copy(args)
        for key, value in spec.items():
            setattr(v, key.replace("-", "_"), value)
        v.dump_state = f"{args.dump_state}.{spec['name']}" if args.dump_state else None
        v.report = f"{args.report}.{spec['name']}" if args.report else None
        v.save_dir = v.save_universal = None
        out.append(v)
    return out


def run(args, make_engine, loss_at, train=None):
    """Every example trainer's job: for each of :func:`variants`, a fresh engine from
    ``make_engine(args)``, the resume (if ``--load-dir``), the state dump, ``--steps`` steps with
    ``loss_at(engine, step)`` as the forward pass (or ``train(engine, args, start)``, which runs
    them and returns the losses: the pipeline engine's ``train_batch``); then :func:`finish`."""
    train = train or (lambda engine, v, start: steps(engine, v, start, lambda step: loss_at(engine, step)))
    runs = variants(args)
    engine, start, losses = None, 0, []
    for v in runs:
        engine = make_engine(v)
        if v.load_dir and not load(engine, v):
            engine = None
            continue
        if v.dump_state:
            dump_state(engine, v.dump_state)
        start = engine.global_steps
        losses = train(engine, v, start)
        if v is not args:
            record(v, start, losses)
            engine = None
    finish(engine, args, start, losses)


def save_if_due(engine, args, step: int):
    """Save after ``step`` when ``--save-at`` names it (the example trainers share this)."""
    if args.save_at is not None and step + 1 == args.save_at:
        save(engine, args)


def save(engine, args):
    """A native save (``--save-dir``) and / or an in-job Universal save (``--save-universal``)."""
    if args.save_dir:
        engine.save_checkpoint(args.save_dir, tag=getattr(args, "tag", None))
    if args.save_universal:
        import uckpt

        gate = _gate_background_save() if args.clobber_after_save else None
        args.injob = uckpt.save_universal(engine, args.save_universal, blocking=not args.background,
                                          inject_missing_state=args.inject_missing_state, log={"quiet": True})
        if gate is not None:  # the live state is NaN for the whole conversion, then restored
            restore = clobber(engine)
            gate.set()
            args.injob = args.injob.wait()
            restore()


def _gate_background_save():
    """Hold the background conversion until the caller has changed the live state (a test of the
    snapshot: the folder must still hold the state of the call)."""
    import threading

    import uckpt.injob.save as injob

    gate, convert = threading.Event(), injob.run
    injob.run = lambda *a, **k: (gate.wait(), convert(*a, **k))[1]
    return gate


def _live_tensors(engine):
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    seen = {}
    for group in engine.optimizer.optimizer.param_groups:
        for p in group["params"]:
            seen[id(p)] = p
            for value in engine.optimizer.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.numel() > 1:
                    seen[id(value)] = value
    for p in engine.module.parameters():
        target = p.ds_tensor if is_zero_param(p) else p
        seen[id(target)] = target
    return list(seen.values())


def clobber(engine):
    """Fill every master weight, moment and model weight with NaN in place; returns the undo."""
    tensors = _live_tensors(engine)
    saved = [t.detach().clone() for t in tensors]
    with torch.no_grad():
        for t in tensors:
            t.fill_(float("nan"))
    return lambda: [t.data.copy_(s) for t, s in zip(tensors, saved)]


def steps(engine, args, start: int, loss_at):
    """``--steps`` steps from ``start``: ``loss_at(step)`` runs the forward pass, then backward, the
    optimizer step, the loss averaged over all ranks and a save when due. Returns the losses."""
    world = dist.get_world_size()
    losses = []
    preempted = Preemption(args.save_universal_on_signal) if args.save_universal_on_signal else None
    for step in range(start, start + args.steps):
        if preempted and args.signal_self_at == step and dist.get_rank() == 0:
            os.kill(os.getpid(), preempted.signum)  # stands in for SLURM signalling the job (test)
        loss = loss_at(step)
        engine.backward(loss)
        engine.step()
        avg = loss.detach().float().clone()
        dist.all_reduce(avg)
        losses.append(avg.item() / world)
        save_if_due(engine, args, step)
        if preempted and preempted.requested():
            import uckpt

            uckpt.save_universal(engine, args.save_universal, log={"quiet": True})
            args.save_universal = None  # saved: nothing more to save at the end
            if dist.get_rank() == 0:
                print(f"saved a Universal checkpoint on SIG{preempted.name} after step {engine.global_steps}",
                      flush=True)
            break
    return losses


class Preemption:
    """The preemption pattern: a signal handler only sets a flag (no collective can run inside it);
    after each step every rank asks whether any rank was signalled (one all-reduce of one number), so
    all ranks save together at the same step even if the signal reached only some of them.

    Under SLURM, ``#SBATCH --signal=USR1@120`` signals the job two minutes before its time limit;
    start ``torchrun`` with USR1 ignored (``trap '' USR1``) so the launcher survives it while the
    training processes, which install this handler, receive it."""

    def __init__(self, name: str):
        import signal

        self.name = name.upper().removeprefix("SIG")
        self.signum = getattr(signal, f"SIG{self.name}")
        self._flag = False
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self._flag = True

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def record(args, start: int, losses):
    """The JSON result on rank 0 (stdout and ``--report``)."""
    if dist.get_rank() == 0:
        result = {"start_step": start, "losses": losses, "world_size": dist.get_world_size()}
        print(json.dumps(result))
        if args.report:
            with open(args.report, "w") as f:
                json.dump(result, f)


def finish(engine, args, start: int, losses):
    """Final save (without ``--save-at``), the JSON result on rank 0, and a clean shutdown (gloo can
    abort at exit after a successful run otherwise). ``engine=None``: the shutdown only."""
    if engine is not None:
        if args.save_at is None:
            save(engine, args)
        injob = getattr(args, "injob", None)
        if injob is not None:
            report = injob if isinstance(injob, dict) else injob.wait()
            if args.report and dist.get_rank() == 0:
                with open(args.report + ".injob.json", "w") as f:
                    json.dump(report, f, default=str)
        record(args, start, losses)
    dist.barrier()
    dist.destroy_process_group()
    # Seen here even after destroy_process_group: at interpreter exit a C++ thread of the CPU comm
    # stack aborts the process ("terminate called without an active exception", SIGABRT) after a run
    # that finished and wrote everything. Everything is saved and flushed by now, so leave without the
    # interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0, help="initial weights (and buffer shift) of a fresh model")
    ap.add_argument("--no-tied", action="store_true")
    ap.add_argument("--no-extras", action="store_true", help="plain model: no frozen / buffer / empty params")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--scheduler", action="store_true", help="a WarmupLR scheduler (DeepSpeed config)")
    ap.add_argument("--load-universal", action=argparse.BooleanOptionalAction, default=True)
    add_job_args(ap)
    args = ap.parse_args(argv)

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by world size {world}")

    def make_engine(args):
        torch.manual_seed(args.seed)
        # ZeRO-3 asserts when it fetches a zero-element parameter in forward (DeepSpeed 0.19.8), so the
        # zero-sized parameter is only part of the model under ZeRO-0/1/2.
        model = TinyLM(args.vocab, args.hidden, args.layers, tied=not args.no_tied, extras=not args.no_extras,
                       empty=args.zero_stage < 3)
        if args.seed and not args.no_extras:
            with torch.no_grad():
                model.gain.add_(0.01 * args.seed)  # a fresh model whose buffer differs from a saved one
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                               config=ds_config(args, world))
        return engine

    mb = args.global_batch // world

    def loss_at(engine, step):
        data = batch(step, args.global_batch, args.seq, args.vocab)[rank * mb:(rank + 1) * mb].to(engine.device)
        logits = engine(data[:, :-1])
        return nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), data[:, 1:].reshape(-1))

    run(args, make_engine, loss_at)


if __name__ == "__main__":
    main()
