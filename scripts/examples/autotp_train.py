"""Train a tiny random-weight Llama (built from a transformers config, never downloaded) or a custom
module with DeepSpeed AutoTP on CPU; save, or resume from a Universal checkpoint at another TP/DP size.

World size = TP size x DP size. The global batch is fixed and split over the DP ranks (TP ranks of
one DP rank see the same rows), so the loss of a step does not depend on the topology.
"""
import argparse

import torch
import torch.distributed as dist

from .tiny_train import add_job_args, run

VOCAB = 128


def build_model(hidden: int = 64, kind: str = "llama", heads: int = 4, kv_heads: int = 2):
    """A tiny random-weight model: a Llama (GQA, vocabulary head) or ``custom`` (:class:`TinyTPNet`, split
    by a custom layer spec with a fused sub-parameter layer). Hugging Face's Phi-3 (fused qkv_proj) does
    not run under AutoTP training here: its attention splits the fused output by the full head count."""
    torch.manual_seed(0)
    if kind == "custom":
        return TinyTPNet(hidden)
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                        max_position_embeddings=64))


class TinyTPNet(torch.nn.Module):
    """Embedding -> 2 blocks -> LayerNorm -> head, split by a custom AutoTP layer specification
    (``CUSTOM_SPEC``): ``up`` column-parallel, ``gate_up`` column-parallel holding two fused
    sub-parameters, ``down`` row-parallel; the norm, embedding and head stay replicated."""

    def __init__(self, hidden: int):
        super().__init__()
        nn = torch.nn
        self.embed = nn.Embedding(VOCAB, hidden)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(hidden, 2 * hidden),
                                                   "gate_up": nn.Linear(hidden, 4 * hidden, bias=False),
                                                   "down": nn.Linear(2 * hidden, hidden)}) for _ in range(2))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, input_ids, labels):
        gelu = torch.nn.functional.gelu
        x = self.embed(input_ids)
        for block in self.blocks:
            gate, up = block["gate_up"](x).chunk(2, dim=-1)
            x = x + block["down"](gelu(gate) * up + block["up"](x))
        logits = self.head(self.norm(x)).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return _Output(loss)


class _Output:
    def __init__(self, loss):
        self.loss = loss


CUSTOM_SPEC = {"use_default_specs": False,
               "layer_specs": [{"patterns": [r".*\.up\.weight$"], "partition_type": "column"},
                               {"patterns": [r".*\.gate_up\.weight$"], "partition_type": "column",
                                "shape": [2, -1], "partition_dim": 0},
                               {"patterns": [r".*\.down\.weight$"], "partition_type": "row"}]}


def tp_config(args) -> dict:
    cfg = {"autotp_size": args.tp}
    if args.model == "custom":
        cfg["partition_config"] = CUSTOM_SPEC
    return cfg


def add_train_args(ap):
    """ZeRO stage, dtype, steps and global batch: the options the Hugging Face example trainers share."""
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    add_train_args(ap)
    ap.add_argument("--hidden", type=int, default=64, help="model width")
    ap.add_argument("--model", choices=["llama", "custom"], default="llama")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    add_job_args(ap)
    args = ap.parse_args(argv)

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // args.tp
    per_dp = args.global_batch // dp

    def make_engine(args):
        model = build_model(args.hidden, args.model, args.heads, args.kv_heads)
        # No train_batch_size: DeepSpeed 0.19.8 checks it against the world size under ZeRO-1/2 and, under
        # ZeRO-3 with AutoTP, against different sizes on different ranks (seen here); it derives it instead.
        cfg = {"train_micro_batch_size_per_gpu": per_dp, "gradient_accumulation_steps": 1,
               "optimizer": {"type": "Adam", "params": {"torch_adam": True, "lr": args.lr}},
               "zero_optimization": {"stage": args.zero_stage}, "bf16": {"enabled": args.dtype == "bf16"},
               "tensor_parallel": tp_config(args), "steps_per_print": 10**9}
        if args.load_dir and args.loader != "uckpt":
            cfg["checkpoint"] = {"load_universal": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return engine

    run(args, make_engine, lm_loss(args, (rank // args.tp) * per_dp, per_dp))


def lm_loss(args, row: int, rows: int):
    """The forward pass of a causal LM on rows ``[row, row + rows)`` of each step's fixed global batch
    (shared by the Hugging Face example trainers)."""
    def loss_at(engine, step):
        g = torch.Generator().manual_seed(1000 + step)
        data = torch.randint(0, VOCAB, (args.global_batch, 16), generator=g)[row:row + rows]
        return engine(input_ids=data, labels=data).loss
    return loss_at

if __name__ == "__main__":
    main()
