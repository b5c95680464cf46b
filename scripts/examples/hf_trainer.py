"""Train a tiny random-weight Llama with the Hugging Face ``Trainer`` and DeepSpeed ZeRO-2 on CPU; save
Trainer checkpoints, or resume one (converted to a Universal checkpoint) at another world size.

Run under ``torchrun`` with ``DS_ACCELERATOR=cpu`` (gloo, bf16, DeepSpeed's torch Adam). The global batch
(``--global-batch``, default 6) is split over the ranks (3 rows each at 2 processes, 2 at 3), the sampler
is sequential and the rows of a step are the same at any world size, so a resumed run continues the
loss curve of an uninterrupted one. To resume at another world size, convert the DeepSpeed folder first:

    python -m uckpt convert --input_folder OUT/checkpoint-4/global_step4 \\
        --output_folder OUT/checkpoint-4/global_step4_universal --inject_missing_state

which also writes ``OUT/checkpoint-4/latest_universal``; ``--resume-from OUT/checkpoint-4`` then sets
``"checkpoint": {"load_universal": true}`` and DeepSpeed's ``load_checkpoint`` (called by the Trainer)
reads the Universal folder.

On a machine without a GPU, transformers 5.22 / accelerate 1.15 need two settings to run DeepSpeed at all:
``bf16=True`` alone is refused ("Your setup doesn't support bf16/gpu. You need to assign use_cpu ..."), and
``use_cpu=True`` alone makes accelerate drop DeepSpeed; without ``use_cpu`` the Trainer's own accelerate state
finds no GPU backend and counts one process, so DeepSpeed fails its batch check ("train_batch_size is not
equal to micro_batch_per_gpu * gradient_acc_step * world_size 3 != 3 * 1 * 2"). So the state is set up first
(``PartialState(backend="gloo")`` with ``ACCELERATE_USE_DEEPSPEED``) and the Trainer told to use it.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

from .autotp_train import VOCAB, build_model
from .tiny_train import finish

SEQ = 16


class Tokens(torch.utils.data.Dataset):
    """``rows`` fixed random sequences (seed 0); a causal LM's labels are its inputs."""

    def __init__(self, rows: int):
        self.data = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def ds_config(args) -> dict:
    """ZeRO-2 with "auto" values the Trainer fills in from its arguments (batch sizes, lr, clipping)."""
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           # torch_adam: DeepSpeed's fused CPU Adam would need a compiled op
           "optimizer": {"type": "Adam", "params": {"torch_adam": True, "lr": "auto", "betas": "auto",
                                                    "eps": "auto", "weight_decay": "auto"}},
           "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "steps_per_print": 10**9}
    if args.resume_from:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save-dir", required=True, help="the Trainer's output_dir (checkpoint-N folders)")
    ap.add_argument("--steps", type=int, default=8, help="max_steps")
    ap.add_argument("--save-steps", type=int, default=0, help="save every N steps (0: never)")
    ap.add_argument("--resume-from", default=None, help="a checkpoint-N folder holding latest_universal")
    ap.add_argument("--global-batch", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--report", default=None, help="JSON file: losses, learning rates and steps (rank 0)")
    args = ap.parse_args(argv)

    import deepspeed
    from accelerate import PartialState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    # the accelerate state the Trainer is told to use (see above): DeepSpeed, over gloo, all the ranks
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    assert args.global_batch % world == 0, "the global batch must split evenly over the ranks"

    targs = TrainingArguments(
        output_dir=args.save_dir, max_steps=args.steps, per_device_train_batch_size=args.global_batch // world,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.1, max_grad_norm=1.0, bf16=True, deepspeed=ds_config(args),
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 1,
        logging_steps=1, report_to="none", seed=0, train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=True, accelerator_config={"use_configured_state": True})  # the CPU settings (see above)

    report = {"world": world, "losses": [], "lrs": [], "logged_steps": []}

    class Record(TrainerCallback):
        """The steps when this run's first step begins (after any resume), and every logged loss."""

        def on_step_begin(self, _args, state, control, **kwargs):
            if "start" not in report:
                report["start"] = {"global_step": state.global_step,
                                   "engine_global_steps": trainer.model_wrapped.global_steps}

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                report["losses"].append(logs["loss"])
                report["lrs"].append(logs.get("learning_rate"))
                report["logged_steps"].append(state.global_step)

    trainer = Trainer(model=build_model(), args=targs, train_dataset=Tokens(args.steps * args.global_batch),
                      callbacks=[Record()])
    trainer.train(resume_from_checkpoint=args.resume_from)
    report["end"] = {"global_step": trainer.state.global_step,
                     "engine_global_steps": trainer.model_wrapped.global_steps}
    if args.report and dist.get_rank() == 0:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    finish(None, args, 0, [])  # the trainers' clean shutdown (gloo can abort the interpreter's teardown)


if __name__ == "__main__":
    main()
