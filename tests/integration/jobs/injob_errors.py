"""Run under torchrun (2 ranks, CPU): uckpt.save_universal's refusals in a live DeepSpeed job.

argv: <save dir> <result json>. Each case records the exception type (and message) every rank saw; the
last case (a call on rank 0 only) leaves the job able to finish: rank 1 waits in a barrier.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import deepspeed
import uckpt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "scripts"))
from examples.tiny_train import TinyLM, batch, param_groups  # noqa: E402

save_dir, result_path = sys.argv[1], sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
result = {}


def engine_for(optimizer=None, offload=False):
    torch.manual_seed(0)
    model = TinyLM(64, 32, 2)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "optimizer": optimizer or {"type": "Adam", "params": {"torch_adam": True, "lr": 1e-2}},
           "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if optimizer is not None:
        cfg["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)
    data = batch(0, 4, 8, 64)[2 * rank:2 * rank + 2]
    loss = torch.nn.functional.cross_entropy(engine(data[:, :-1]).float().reshape(-1, 64), data[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()
    return engine


def outcome(key, call):
    """Run ``call`` on this rank; record every rank's exception type (or "ok") under ``key``."""
    try:
        call()
        mine, message = "ok", ""
    except uckpt.UckptError as exc:
        mine, message = type(exc).__name__, str(exc)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (mine, message))
    result[key] = [m for m, _ in seen]
    result[key + "_message"] = next((msg for _, msg in seen if msg), "")


engine = engine_for()
quiet = {"log": {"quiet": True}, "dist": {"timeout_s": 60}}
uckpt.save_universal(engine, save_dir, tag="t", **quiet)
outcome("exists", lambda: uckpt.save_universal(engine, save_dir, tag="t", **quiet))
outcome("overwrite", lambda: uckpt.save_universal(engine, save_dir, tag="t", overwrite=True, **quiet))
result["overwrite"] = "ok" if result["overwrite"] == ["ok", "ok"] else result["overwrite"]

try:
    sgd = engine_for({"type": "SGD", "params": {"lr": 1e-2, "momentum": 0.9}})
    outcome("sgd", lambda: uckpt.save_universal(sgd, save_dir, tag="sgd", **quiet))
except Exception as exc:  # noqa: BLE001 - DeepSpeed may refuse the optimizer itself
    result["sgd"], result["sgd_message"] = [f"deepspeed: {type(exc).__name__}"], str(exc)[:300]

offload = engine_for(offload=True)
offload.save_checkpoint(os.path.join(save_dir, "native"), tag="offload")  # the test converts it with DeepSpeed
report = uckpt.save_universal(offload, save_dir, tag="offload", **quiet)
result["offload"] = "ok"
result["offload_params"] = report["checkpoint"]["params"]

# client state torch.save cannot pickle: a one-line error on the writing rank, every rank stops at once
t_bad = time.monotonic()
outcome("unpicklable", lambda: uckpt.save_universal(engine, save_dir, tag="bad", client_state={"f": lambda: 0},
                                                    **quiet))
result["unpicklable_seconds"] = time.monotonic() - t_bad

# a second background save while one is in flight first waits for it; both publish
first = uckpt.save_universal(engine, save_dir, tag="bg1", blocking=False, **quiet)
second = uckpt.save_universal(engine, save_dir, tag="bg2", blocking=False, **quiet)
result["first_done_when_second_returned"] = first.done()
result["background_pair"] = [os.path.isdir(os.path.join(save_dir, t)) for t in ("bg1", "bg2")] if \
    (first.wait() and second.wait()) else None

# a background save that fails (its save folder is a file) raises in wait() on every rank, publishes nothing
blocker = os.path.join(save_dir, "a-file")
if rank == 0:
    open(blocker, "w").close()
dist.barrier()
failing = uckpt.save_universal(engine, blocker, tag="x", blocking=False, **quiet)
outcome("background_failure", failing.wait)

t0 = time.monotonic()
if rank == 0:
    outcome_local = None
    try:
        uckpt.save_universal(engine, save_dir, tag="one", log={"quiet": True}, dist={"timeout_s": 5})
        outcome_local = ("ok", "")
    except uckpt.UckptError as exc:
        outcome_local = (type(exc).__name__, str(exc))
    result["one_rank"], result["one_rank_message"] = [outcome_local[0]], outcome_local[1]
    result["one_rank_seconds"] = time.monotonic() - t0
dist.barrier()
if rank == 0:
    with open(result_path, "w") as f:
        json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
