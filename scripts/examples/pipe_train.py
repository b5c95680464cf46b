"""Train a tiny pipeline-parallel model (DeepSpeed PipelineModule, tied embedding / head) on CPU.

Same command-line shape as ``tiny_train``: ``--save-dir``, ``--load-dir`` (Universal), ``--dump-state``,
``--report``. The world size is ``--stages`` x the data-parallel size; the global batch is fixed.
"""
import argparse

import torch
import torch.distributed as dist
from torch import nn

from .tiny_train import add_job_args, batch, run, save_if_due

VOCAB, HIDDEN = 64, 32


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, HIDDEN) * 0.1)

    def forward(self, x):
        return nn.functional.embedding(x, self.weight)


def head_forward(module, x):
    return x @ module.weight.t().to(x.dtype)


def loss_fn(logits, labels):
    return nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=8)
    add_job_args(ap)
    args = ap.parse_args(argv)

    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    dp = world // args.stages
    mb = args.global_batch // dp // 2

    def make_engine(args):
        torch.manual_seed(0)
        layers = [TiedLayerSpec("embed", Embed), LayerSpec(nn.Linear, HIDDEN, HIDDEN), LayerSpec(nn.Tanh),
                  LayerSpec(nn.Linear, HIDDEN, HIDDEN), LayerSpec(nn.LayerNorm, HIDDEN),
                  TiedLayerSpec("embed", Embed, forward_fn=head_forward)]
        model = PipelineModule(layers=layers, num_stages=args.stages, loss_fn=loss_fn, partition_method="uniform")
        cfg = {"train_batch_size": args.global_batch, "train_micro_batch_size_per_gpu": mb,
               "gradient_accumulation_steps": 2,
               "optimizer": {"type": "Adam", "params": {"torch_adam": True, "lr": 1e-2}},
               "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "steps_per_print": 10**9}
        if args.load_dir and args.loader != "uckpt":
            cfg["checkpoint"] = {"load_universal": True}
        engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        return engine

    def train(engine, args, start):
        """``--steps`` pipeline steps (two micro-batches each, this DP rank's share of the batch)."""
        dp_rank = engine.grid.get_data_parallel_rank()
        losses = []
        for step in range(start, start + args.steps):
            data = batch(step, args.global_batch, args.seq, VOCAB)
            local = data[dp_rank * (2 * mb):(dp_rank + 1) * (2 * mb)]
            micro = iter([(local[i * mb:(i + 1) * mb, :-1], local[i * mb:(i + 1) * mb, 1:]) for i in range(2)])
            losses.append(float(engine.train_batch(micro)))
            save_if_due(engine, args, step)
        return losses

    run(args, make_engine, None, train)

if __name__ == "__main__":
    main()
