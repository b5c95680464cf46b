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
    if args.load_dir and args.loader == "deepspeed":
        cfg["checkpoint"] = {"load_universal": args.load_universal}
    return cfg


def dump_state(engine, path: str):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": None}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad or p.numel() == 0 and not hasattr(p, "ds_numel"):
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:
            continue
        out["params"][name] = full.detach().clone().cpu()
        for key in ("exp_avg", "exp_avg_sq"):
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
    if dist.get_rank() == 0:
        torch.save(out, path)


def _rchar() -> int:
    """Bytes this process has read through read(2)-family calls (Linux /proc/self/io), else 0."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return 0


def load(engine, args):
    """Resume with DeepSpeed's own loader or uckpt's rank-aware one (the example trainers share this).
    With ``--report``, each rank writes ``<report>.load<rank>.json``: bytes it read while loading."""
    before = _rchar()
    info = {"loader": args.loader}
    if args.loader == "uckpt":
        import uckpt

        client = uckpt.load_into_engine(engine, args.load_dir, tag=args.load_tag,
                                        trust_checkpoint=getattr(args, "trust_checkpoint", False))
        info.update(client.pop("uckpt"))
        info["client_types"] = {k: f"{type(v).__module__}.{type(v).__qualname__}" for k, v in client.items()}
    else:
        engine.load_checkpoint(args.load_dir, tag=args.load_tag)
    info["rchar"] = _rchar() - before
    if args.report:
        with open(args.report + f".load{dist.get_rank()}.json", "w") as f:
            json.dump(info, f)


def add_job_args(ap):
    """The save / resume / report options every example trainer takes."""
    ap.add_argument("--save-dir", help="save a native checkpoint here")
    ap.add_argument("--save-at", type=int, default=None, help="save after this many steps (default: at the end)")
    ap.add_argument("--load-dir", help="resume from this folder (Universal) before training")
    ap.add_argument("--load-tag", default=None)
    ap.add_argument("--loader", choices=["deepspeed", "uckpt"], default="deepspeed",
                    help="resume with engine.load_checkpoint (deepspeed) or uckpt.load_into_engine")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="with --loader uckpt: unpickle the client state fully (UNSAFE on files from elsewhere)")
    ap.add_argument("--dump-state", help="write full fp32/moments/step after start-up (rank 0)")
    ap.add_argument("--report", help="write a JSON report of the losses (rank 0)")


def save_if_due(engine, args, step: int):
    """Save after ``step`` when ``--save-at`` names it (the example trainers share this)."""
    if args.save_dir and args.save_at is not None and step + 1 == args.save_at:
        engine.save_checkpoint(args.save_dir, tag=getattr(args, "tag", None))


def train_steps(engine, args, start: int, loss_at):
    """``--steps`` steps from ``start``: ``loss_at(step)`` runs the forward pass, then backward, the
    optimizer step, the loss averaged over all ranks and a save when due; then :func:`finish`
    (the example trainers share this loop)."""
    world = dist.get_world_size()
    losses = []
    for step in range(start, start + args.steps):
        loss = loss_at(step)
        engine.backward(loss)
        engine.step()
        avg = loss.detach().float().clone()
        dist.all_reduce(avg)
        losses.append(avg.item() / world)
        save_if_due(engine, args, step)
    finish(engine, args, start, losses)


def finish(engine, args, start: int, losses):
    """Final save (without ``--save-at``), the JSON result on rank 0, and a clean shutdown (gloo can
    abort at exit after a successful run otherwise)."""
    if args.save_dir and args.save_at is None:
        engine.save_checkpoint(args.save_dir, tag=getattr(args, "tag", None))
    if dist.get_rank() == 0:
        result = {"start_step": start, "losses": losses, "world_size": dist.get_world_size()}
        print(json.dumps(result))
        if args.report:
            with open(args.report, "w") as f:
                json.dump(result, f)
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
    ap.add_argument("--load-universal", action=argparse.BooleanOptionalAction, default=True)
    add_job_args(ap)
    args = ap.parse_args(argv)

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by world size {world}")

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
    start = 0
    if args.load_dir:
        load(engine, args)
        start = engine.global_steps
    if args.dump_state:
        dump_state(engine, args.dump_state)

    mb = args.global_batch // world

    def loss_at(step):
        data = batch(step, args.global_batch, args.seq, args.vocab)[rank * mb:(rank + 1) * mb].to(engine.device)
        logits = engine(data[:, :-1])
        return nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), data[:, 1:].reshape(-1))

    train_steps(engine, args, start, loss_at)


if __name__ == "__main__":
    main()
