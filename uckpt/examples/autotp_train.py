"""Train a tiny random-weight Llama (built from a transformers config, never downloaded) with
DeepSpeed AutoTP on CPU; save, or resume from a Universal checkpoint at another TP/DP size.

World size = TP size x DP size. The global batch is fixed and split over the DP ranks (TP ranks of
one DP rank see the same rows), so the loss of a step does not depend on the topology.
"""
import argparse

import torch
import torch.distributed as dist

from .tiny_train import add_job_args, dump_state, finish, load, save_if_due

VOCAB = 128


def build_model(hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64, help="model width (4 heads, 2 kv heads)")
    add_job_args(ap)
    args = ap.parse_args(argv)

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // args.tp
    model = build_model(args.hidden)
    per_dp = args.global_batch // dp
    # No train_batch_size: DeepSpeed 0.19.8 checks it against the world size under ZeRO-1/2 and, under
    # ZeRO-3 with AutoTP, against different sizes on different ranks (seen here); it derives it instead.
    cfg = {"train_micro_batch_size_per_gpu": per_dp, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "Adam", "params": {"torch_adam": True, "lr": 1e-2}},
           "zero_optimization": {"stage": args.zero_stage}, "bf16": {"enabled": args.dtype == "bf16"},
           "tensor_parallel": {"autotp_size": args.tp}, "steps_per_print": 10**9}
    if args.load_dir and args.loader == "deepspeed":
        cfg["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    resume_and_train(engine, args, (rank // args.tp) * per_dp, per_dp)


def resume_and_train(engine, args, row: int, rows: int):
    """Resume if asked, then train ``--steps`` steps of a causal LM on rows ``[row, row + rows)`` of each
    step's fixed global batch (shared by the Hugging Face example trainers)."""
    if args.load_dir:
        load(engine, args)
    if args.dump_state:
        dump_state(engine, args.dump_state)
    world = dist.get_world_size()
    losses = []
    start = engine.global_steps
    for step in range(start, start + args.steps):
        g = torch.Generator().manual_seed(1000 + step)
        data = torch.randint(0, VOCAB, (args.global_batch, 16), generator=g)[row:row + rows]
        loss = engine(input_ids=data, labels=data).loss
        engine.backward(loss)
        engine.step()
        t = loss.detach().float().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
        save_if_due(engine, args, step)
    finish(engine, args, start, losses)

if __name__ == "__main__":
    main()
