"""Train a tiny random-weight Mixtral (built from a transformers config, never downloaded) with
DeepSpeed AutoEP on CPU; save, or resume from a Universal checkpoint at another ``autoep_size``.

Routed experts are sharded over ``--ep`` ranks; the rest of the model is data parallel over all
ranks. The global batch is fixed and split over the ranks, so a step's loss does not depend on the
topology. ``"use_grouped_mm": false`` is needed on CPU (the grouped GEMM kernels are GPU-only).
"""
import argparse

import torch
import torch.distributed as dist

from .autotp_train import VOCAB, add_train_args, lm_loss
from .tiny_train import add_job_args, run


def build_model(experts: int = 8, hidden: int = 32):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_local_experts=experts, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=2, help="autoep_size")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--data-before-ep", action="store_true",
                    help="DeepSpeed's use_data_before_expert_parallelism expert-data layout")
    add_train_args(ap)
    add_job_args(ap)
    args = ap.parse_args(argv)

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = args.global_batch // world

    def make_engine(args):
        model = build_model(args.experts, args.hidden)
        cfg = {"train_micro_batch_size_per_gpu": per_rank, "gradient_accumulation_steps": 1,
               "optimizer": {"type": "Adam", "params": {"torch_adam": True, "lr": args.lr}},
               "zero_optimization": {"stage": args.zero_stage}, "bf16": {"enabled": args.dtype == "bf16"},
               "expert_parallel": {"enabled": True, "autoep_size": args.ep, "preset_model": "mixtral",
                                   "use_grouped_mm": False},
               "steps_per_print": 10**9}
        if args.data_before_ep:
            cfg["use_data_before_expert_parallelism"] = True
        if args.load_dir and args.loader != "uckpt":
            cfg["checkpoint"] = {"load_universal": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return engine

    run(args, make_engine, lm_loss(args, rank * per_rank, per_rank))


if __name__ == "__main__":
    main()
