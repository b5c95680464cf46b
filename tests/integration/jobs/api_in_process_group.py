"""Run under torchrun: the caller owns the process group and calls uckpt.convert on every rank."""
import json
import sys

import torch.distributed as dist

import uckpt

dist.init_process_group("gloo")
report = uckpt.convert(sys.argv[1], sys.argv[2], inject_missing_state=True, log={"quiet": True})
assert dist.is_initialized(), "uckpt must not tear down a process group it did not create"
if dist.get_rank() == 0:
    with open(sys.argv[3], "w") as f:
        json.dump({"world": dist.get_world_size(), "ranks": len(report["ranks"]), "backend": report["backend"]}, f)
dist.barrier()
dist.destroy_process_group()
