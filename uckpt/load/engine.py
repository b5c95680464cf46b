"""Rank-aware loading of a Universal checkpoint into a live DeepSpeed engine: each rank reads the
bytes of its own slices only (:mod:`uckpt.load.slicing` has the rules, :mod:`uckpt.torchsave.reader`
does the reads).

:func:`load_into_engine` restores an engine of ZeRO stage 1, 2 or 3 (any DP / TP / EP size) to the
state ``engine.load_checkpoint`` with ``load_universal`` reaches, reading for each parameter only the
rank's ZeRO fragment (stage 1/2) or partition (stage 3) of its TP / EP slice. Beyond DeepSpeed it
loads a ZeRO-1/2-made Universal checkpoint into a ZeRO-3 run and the reverse, restores frozen
parameters and buffers, keeps each param group's own hyperparameters at ZeRO-3, restores ``step``
from a ZeRO-3-made checkpoint into a ZeRO-1/2 run, and names the parameter and both shapes on a
mismatch. :mod:`uckpt.load.state_dict` serves plain-PyTorch users.
"""
import os
from typing import Any, Dict, Optional, Tuple

import torch

from ..dsformat import constants as C
from ..errors import CheckpointError
from ..dsformat.universal import deepspeed_classes
from ..torchsave import reader as ranged
from ..torchsave.format import materialize
from ..torchsave.stats import IO
from .folder import StateFiles, _model_state_file, _optimizer_state, _param_folder, _read_step, _saved_groups_and_step, \
    _state_keys, _state_path, resolve_folder
from ..dsformat.zero3 import zero3_span
from .slicing import Target, read_flat, shard_map


def _apply_hyperparameters(groups, saved_groups):
    for group, saved in zip(groups, saved_groups):
        for key, value in saved.items():
            if key != "params":
                group[key] = value


def _tp_info(optimizer) -> Tuple[int, int]:
    """DeepSpeed's own TP rank / size lookup for ZeRO-1/2 (``base_optimizer``)."""
    from deepspeed.runtime.utils import bwc_tensor_model_parallel_rank

    mpu = getattr(optimizer, "mpu", None)
    if mpu is None:
        return bwc_tensor_model_parallel_rank(mpu=None), 1
    size = (mpu.get_slice_parallel_world_size() if hasattr(mpu, "get_slice_parallel_world_size")
            else mpu.get_tensor_model_parallel_world_size())
    return bwc_tensor_model_parallel_rank(mpu=mpu), size


def _lp_groups(optimizer):
    for attr in ("bit16_groups", "bf16_groups"):
        if hasattr(optimizer, attr):
            return getattr(optimizer, attr)
    return None


def _is_stage3(optimizer) -> bool:
    return hasattr(optimizer, "fp32_partitioned_groups_flat") and hasattr(optimizer, "fp16_groups")


def _target(param, name: str, local_shape, tp=(0, 1), ep=(0, 1)) -> Target:
    return Target(tuple(local_shape), tp[0], tp[1], ep[0], ep[1], getattr(param, C.DS_AUTOTP_UC_META, None),
                  getattr(param, C.DS_AUTOEP_UC_META, None), name)


def _fragment(files: StateFiles, name: str, state: str, target: Target, start: int, numel: int) -> torch.Tensor:
    tensor, info = files.open(name, state)
    return read_flat(tensor, shard_map(tensor.shape, info, target, state), start, numel)


def _load_zero12(optimizer, files: StateFiles, steps_fallback):
    from deepspeed.runtime.base_optimizer import _get_universal_checkpoint_ep_info
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    tp = _tp_info(optimizer)
    ep = _get_universal_checkpoint_ep_info()
    lp_groups = _lp_groups(optimizer)
    for i, group in enumerate(optimizer.optimizer.param_groups):
        keys, steps = set(), []
        for lp in lp_groups[i]:
            mapping = lp._hp_mapping
            if mapping is None:
                continue
            name = optimizer.param_names[lp]
            pfolder = _param_folder(files.folder, name)
            mapping.optim_fragment = {}
            address = mapping.lp_fragment_address
            target = _target(lp, name, lp.shape, tp, ep)
            for state in _state_keys(pfolder):
                frag = _fragment(files, name, state, target, address.start, address.numel)
                if state == C.FP32_WEIGHT_KEY:
                    mapping.get_hp_fragment().data.copy_(frag)
                else:
                    mapping.optim_fragment[state] = frag
            keys.update(mapping.get_optim_state_keys())
            steps.append(_read_step(pfolder))
        hp = group["params"][0]
        if steps and any(s is None for s in steps) and steps_fallback is not None:
            # a ZeRO-3-made checkpoint has no step.pt: DeepSpeed would resume with no step at all
            steps = [_as_step(steps_fallback, optimizer.optimizer.state[hp])]
        if any(not _same(s, steps[0]) for s in steps):
            raise CheckpointError(f"param group {i}: parameters saved different steps {sorted(set(map(float, steps)))}",
                                  path=files.folder)
        if steps and steps[0] is not None:
            optimizer.optimizer.state[hp][C.STEP_KEY] = steps[0]
        map_to_flat_opt_states(hp, lp_groups[i], optimizer.optimizer.state, keys)


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and float(a) == float(b))


def _stage3_ep(param) -> Tuple[int, int]:
    """A ZeRO-3 expert parameter's EP rank / size, from the group it is partitioned over (as DeepSpeed)."""
    from deepspeed.utils import groups

    name = getattr(param, "ds_zero_partition_group_name", None)
    if name is not None and name in groups._get_expert_parallel_group_dict():
        return groups._get_expert_parallel_rank(name), groups._get_expert_parallel_world_size(name)
    return 0, 1


def _stage3_partition(optimizer, param, files: StateFiles, state: str) -> torch.Tensor:
    import torch.distributed as dist
    from deepspeed.utils import groups

    name = optimizer.param_names[param]
    group = optimizer._get_param_partition_group(param)
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    meta = getattr(param, C.DS_AUTOTP_UC_META, None)
    tp = (0, 1)
    if meta:
        tp_group = groups.get_tensor_model_parallel_group()
        tp = (dist.get_rank(tp_group), dist.get_world_size(tp_group))
    target = _target(param, name, param.ds_shape, tp, _stage3_ep(param))
    tensor, info = files.open(name, state)
    smap = shard_map(tensor.shape, info, target, state)
    start, length, size = zero3_span(smap.numel, rank, world)
    if size != param.partition_numel():
        raise CheckpointError(f"parameter {name}: the checkpoint's shard {list(smap.shard_shape)} does not match the "
                              f"target's {list(param.ds_shape)}", path=_state_path(files.folder, name, state))
    out = torch.zeros(size, dtype=tensor.torch_dtype)
    out[:length] = read_flat(tensor, smap, start, length)
    return out


def _load_stage3(optimizer, files: StateFiles, saved_groups, step):
    if getattr(optimizer, "swap_optimizer", False):
        raise CheckpointError("NVMe optimizer offload is not supported by uckpt.load_into_engine",
                              fix="load with DeepSpeed's engine.load_checkpoint(load_universal=True)")
    for state in C.TENSOR_STATES:
        for sub_group, params in enumerate(optimizer.fp16_groups):
            flat = optimizer.fp32_partitioned_groups_flat[sub_group]
            values = torch.zeros_like(flat)
            offset = 0
            for param in params:
                part = _stage3_partition(optimizer, param, files, state)
                values.narrow(0, offset, part.numel()).copy_(part)
                offset += part.numel()
            if state == C.FP32_WEIGHT_KEY:
                flat.data.copy_(values)
                if step is not None:
                    optimizer.optimizer.state[flat][C.STEP_KEY] = _as_step(step, optimizer.optimizer.state[flat])
            else:
                optimizer.optimizer.state[flat][state] = values
    _apply_hyperparameters(optimizer.optimizer.param_groups, saved_groups)
    for sub_group, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
        if sum(flat.size()) > 0:
            optimizer.fp16_partitioned_groups_flat[sub_group].data.copy_(flat.data)
    for sub_group, flat16 in enumerate(optimizer.fp16_partitioned_groups_flat):
        for part, value in zip(optimizer.fp16_partitioned_groups[sub_group],
                               optimizer.unflatten(flat16, optimizer.fp16_partitioned_groups[sub_group])):
            part.data = value.data


def _as_step(step, existing: Dict[str, Any]):
    """Keep the optimizer's own step type (torch Adam holds a tensor)."""
    current = existing.get(C.STEP_KEY)
    if torch.is_tensor(current) and not torch.is_tensor(step):
        return torch.tensor(float(step), dtype=current.dtype, device=current.device)
    return step


def _first_step(folder: str) -> Any:
    zero = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER)
    for name in sorted(os.listdir(zero)):
        step = _read_step(os.path.join(zero, name)) if os.path.isdir(os.path.join(zero, name)) else None
        if step is not None:
            return step
    return None


def _restore_module_extras(engine, files: StateFiles, stage3: bool, tp=(0, 1)) -> Dict[str, str]:
    """Frozen parameters and buffers, which DeepSpeed's universal load leaves untouched (spec 6):
    from their ``fp32.pt`` fallback folders, sliced by the same rules."""
    restored = {}
    trainable = {id(p) for g in engine.optimizer.optimizer.param_groups for p in g["params"]}
    lp_ids = set()
    if not stage3 and _lp_groups(engine.optimizer) is not None:
        lp_ids = {id(p) for group in _lp_groups(engine.optimizer) for p in group}
    items = [(n, p, True) for n, p in engine.module.named_parameters()
             if not p.requires_grad and id(p) not in trainable and id(p) not in lp_ids]
    items += [(n, b, False) for n, b in engine.module.named_buffers()]
    for name, tensor, is_param in items:
        path = _state_path(files.folder, name, C.FP32_WEIGHT_KEY)
        if not os.path.isfile(path):
            continue
        shape = tuple(tensor.ds_shape) if stage3 and hasattr(tensor, "ds_shape") else tuple(tensor.shape)
        target = _target(tensor, name, shape, tp)
        file_tensor, info = files.open_path(path)
        smap = shard_map(file_tensor.shape, info, target, C.FP32_WEIGHT_KEY)
        if tuple(smap.shard_shape) != shape:
            raise CheckpointError(f"{'frozen parameter' if is_param else 'buffer'} {name}: checkpoint shape "
                                  f"{list(smap.shard_shape)}, target shape {list(shape)}", path=path)
        value = read_flat(file_tensor, smap, 0, smap.numel).view(shape)
        if stage3 and hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                tensor.data.copy_(value.to(tensor.dtype))
        else:
            tensor.data.copy_(value.to(tensor.dtype))
        restored[name] = "frozen" if is_param else "buffer"
    return restored


def _precheck(optimizer, files: StateFiles, stage3: bool):
    """Every rank checks every trainable parameter before touching the engine, so a missing folder or
    a shape mismatch fails on all ranks alike instead of leaving some waiting in a collective."""
    from deepspeed.runtime.base_optimizer import _get_universal_checkpoint_ep_info

    groups = optimizer.fp16_groups if stage3 else _lp_groups(optimizer)
    tp = (0, 1) if stage3 else _tp_info(optimizer)
    ep = None if stage3 else _get_universal_checkpoint_ep_info()
    for params in groups:
        for param in params:
            name = optimizer.param_names[param]
            pfolder = _param_folder(files.folder, name)
            if C.FP32_WEIGHT_KEY not in _state_keys(pfolder):
                raise CheckpointError(f"parameter {name} has no fp32.pt", path=pfolder,
                                      fix="the Universal folder is incomplete; convert again")
            tensor, info = files.open(name, C.FP32_WEIGHT_KEY)
            shape = tuple(param.ds_shape) if stage3 else tuple(param.shape)
            smap = shard_map(tensor.shape, info, _target(param, name, shape, tp, ep or _stage3_ep(param)),
                             C.FP32_WEIGHT_KEY)
            if smap.numel != torch.Size(shape).numel() and not getattr(param, C.DS_AUTOTP_UC_META, None):
                raise CheckpointError(f"parameter {name}: checkpoint shape {list(tensor.shape)} gives this rank "
                                      f"{list(smap.shard_shape)}, the target parameter is {list(shape)}",
                                      path=pfolder, fix="load into a model of the same architecture")


def load_into_engine(engine, load_dir: str, tag: Optional[str] = None, config: Optional[str] = None,
                     **options: Any) -> Dict[str, Any]:
    """Restore ``engine`` (ZeRO stage 1, 2 or 3; any DP / TP / EP size) from a Universal checkpoint.

    Every rank calls it. ``config`` is an omegaconf YAML of :class:`uckpt.options.LoadConfig` keys
    (``tag``, ``module_extras``, ``lr_scheduler_states``, ``trust_checkpoint``); ``options`` override it.
    Returns the client state of the model-state file (keys DeepSpeed does not consume) plus ``"uckpt"``:
    the folder loaded, bytes read by this rank, and what was restored. Every file is read safely: objects
    of classes outside DeepSpeed's checkpoint classes come back as inert stand-ins, unless
    ``trust_checkpoint=True`` (UNSAFE: it runs whatever code the model-state file names) unpickles the
    client state fully.
    """
    from .. import options as optmod

    values = dict(options, **({"tag": tag} if tag is not None else {}))
    cfg = optmod.build(config, values=values, schema=optmod.LoadConfig)
    load_lr_scheduler_states, load_module_extras = cfg.lr_scheduler_states, cfg.module_extras
    folder = resolve_folder(load_dir, cfg.tag)
    files = StateFiles(folder)
    before = IO.snapshot()
    optimizer = engine.optimizer
    stage3 = _is_stage3(optimizer)
    if not stage3 and _lp_groups(optimizer) is None:
        raise CheckpointError(f"engine optimizer {type(optimizer).__name__} is not a ZeRO-1/2/3 or BF16 optimizer",
                              fix="enable zero_optimization (stage 1, 2 or 3) or bf16 in the DeepSpeed config")
    _precheck(optimizer, files, stage3)
    model_file = _model_state_file(folder, getattr(engine, "checkpoint_mp_rank", 0) or 0,
                                   max(1, getattr(engine, "mp_world_size", 1) or 1))
    # the engine-level scalars only: the file's module weights stay unread
    checkpoint = materialize(ranged.open_lazy(model_file), deepspeed_classes()) if model_file else {}
    if hasattr(optimizer, "checkpoint_event_prologue"):
        optimizer.checkpoint_event_prologue()

    optim_sd = _optimizer_state(folder)
    saved_groups, zero3_step = _saved_groups_and_step(optim_sd)
    if stage3:
        step = zero3_step if zero3_step is not None else _first_step(folder)
        if hasattr(optimizer, "_load_global_state_stage3"):
            optimizer._load_global_state_stage3(optim_sd)
        _load_stage3(optimizer, files, saved_groups, step)
    else:
        if C.DS_VERSION in optim_sd or not hasattr(optimizer, "partition_gradients"):
            optimizer._load_global_state(optim_sd)
        _load_zero12(optimizer, files, zero3_step)
        _apply_hyperparameters(optimizer.optimizer.param_groups, saved_groups)

    extras = _restore_module_extras(engine, files, stage3, _tp_info(optimizer) if not stage3 else (0, 1)) \
        if load_module_extras else {}
    if hasattr(optimizer, "checkpoint_event_epilogue"):
        optimizer.checkpoint_event_epilogue()
    if not stage3:
        optimizer.update_lp_params()

    if checkpoint:
        if load_lr_scheduler_states and engine.lr_scheduler is not None and checkpoint.get("lr_scheduler"):
            engine.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        engine.global_steps = checkpoint.get("global_steps", engine.global_steps)
        engine.global_samples = checkpoint.get("global_samples", engine.global_steps * engine.train_batch_size())
        engine.skipped_steps = checkpoint.get("skipped_steps", engine.skipped_steps)
        engine.loaded_checkpoint_mp_world_size = checkpoint.get("mp_world_size")
        engine.loaded_checkpoint_dp_world_size = checkpoint.get("dp_world_size")
    consumed = {C.MODULE_KEY, "buffer_names", "optimizer", C.PARAM_SHAPES, C.FROZEN_PARAM_SHAPES,
                C.SHARED_PARAMS_KEY, C.FROZEN_PARAM_FRAGMENTS, "lr_scheduler", "data_sampler", "random_ltd",
                "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                C.CHECKPOINT_PARALLEL_DIMS, C.DS_CONFIG_KEY, C.DS_VERSION, C.UNIVERSAL_CHECKPOINT_INFO}
    if cfg.trust_checkpoint and model_file:  # unsafe by choice: the caller trusts the file's code
        checkpoint = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
    client = {k: (v.load() if isinstance(v, ranged.FileTensor) else v) for k, v in checkpoint.items()
              if k not in consumed}
    client["uckpt"] = {"folder": folder, "bytes_read": IO.since(before)["read_bytes"],
                       "module_extras": extras, "stage3": stage3}
    return client
