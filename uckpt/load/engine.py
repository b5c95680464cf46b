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
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..dsformat import constants as C
from ..errors import CheckpointError, InvalidCheckpointError, RemoteError, UnsupportedEngineError
from ..dsformat.universal import deepspeed_classes
from ..torchsave import reader as ranged
from ..torchsave.format import map_leaves, materialize
from ..torchsave.stats import IO
from .folder import StateFiles, _model_state_file, _optimizer_state, _param_folder, _read_step, _saved_groups_and_step, \
    _state_keys, _state_path, resolve_folder
from ..dsformat.zero3 import zero3_span
from .slicing import Target, read_flat, shard_map

logger = logging.getLogger("uckpt")


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


def _fragment(files: StateFiles, name: str, state: str, target: Target, start: int, numel: int,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    tensor, info = files.open(name, state)
    return read_flat(tensor, shard_map(tensor.shape, info, target, state), start, numel, out)


def _read_all(files: StateFiles, reads: List[tuple], threads: int):
    """``_fragment(files, *read)`` for each of ``reads`` (each into its own slot), ``threads`` at a time:
    cold reads of many state files queue on the disk together instead of one after another."""
    if threads <= 1 or len(reads) <= 1:
        for read in reads:
            _fragment(files, *read)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="uckpt-load") as pool:
        for _ in pool.map(lambda read: _fragment(files, *read), reads):
            pass


def _load_zero12(optimizer, files: StateFiles, steps_fallback, with_optimizer: bool, missing: Set[str],
                 threads: int = 1):
    """Each trainable parameter's ZeRO-1/2 fragment of ``fp32`` (and, ``with_optimizer``, of its moments
    and step), read straight into the optimizer's flat fp32 partition and into flat moment buffers
    allocated once per group (DeepSpeed's ``map_to_flat_opt_states`` builds the same buffers from
    per-fragment copies: on a 218 M-parameter checkpoint that copy held 70% of a load's time and
    twice the moments' memory), on ``threads`` reader threads. A parameter in ``missing``
    (``load_module_strict=False``) keeps its current values."""
    from deepspeed.runtime.base_optimizer import _get_universal_checkpoint_ep_info

    tp = _tp_info(optimizer)
    ep = _get_universal_checkpoint_ep_info()
    lp_groups = _lp_groups(optimizer)
    for i, group in enumerate(optimizer.optimizer.param_groups):
        steps = []
        hp = group["params"][0]
        flat: Dict[str, torch.Tensor] = {}  # moment -> this group's flat buffer, filled fragment by fragment
        covered = []  # (start, numel) of the fragments in those buffers; the rest (padding) is zeroed
        current = optimizer.optimizer.state.get(hp, {})
        reads = []  # (name, state, target, start, numel, slot) of this group, read once every slot exists
        for lp in lp_groups[i]:
            mapping = lp._hp_mapping
            if mapping is None:
                continue
            name = optimizer.param_names[lp]
            address = mapping.lp_fragment_address
            hp_address = mapping.get_hp_fragment_address()
            if with_optimizer:
                mapping.optim_fragment = {}
            if name in missing:
                if with_optimizer:
                    mapping.optim_fragment = _current_moments(current, mapping)
                    for key, value in mapping.optim_fragment.items():
                        _moment_slot(flat, key, hp, hp_address, mapping).copy_(value)
                    covered.append((hp_address.start, hp_address.numel))
                continue
            pfolder = _param_folder(files.folder, name)
            target = _target(lp, name, lp.shape, tp, ep)
            states = _state_keys(pfolder) if with_optimizer else (C.FP32_WEIGHT_KEY,)
            for state in states:
                slot = mapping.get_hp_fragment().data if state == C.FP32_WEIGHT_KEY else \
                    _moment_slot(flat, state, hp, hp_address, mapping)
                reads.append((name, state, target, address.start, address.numel, slot))
            covered.append((hp_address.start, hp_address.numel))
            if with_optimizer:
                steps.append(_read_step(pfolder))
        _read_all(files, reads, threads)
        if not with_optimizer:
            continue
        _zero_gaps(flat.values(), covered, hp.numel())
        if steps and any(s is None for s in steps) and steps_fallback is not None:
            # a ZeRO-3-made checkpoint has no step.pt: DeepSpeed would resume with no step at all
            steps = [_as_step(steps_fallback, optimizer.optimizer.state[hp])]
        if any(not _same(s, steps[0]) for s in steps):
            raise CheckpointError(f"param group {i}: parameters saved different steps {sorted(set(map(float, steps)))}",
                                  path=files.folder)
        if steps and steps[0] is not None:
            optimizer.optimizer.state[hp][C.STEP_KEY] = steps[0]
        for key, buffer in flat.items():
            optimizer.optimizer.state[hp][key] = buffer


def _moment_slot(flat: Dict[str, torch.Tensor], key: str, hp: torch.Tensor, hp_address, mapping) -> torch.Tensor:
    """The part of ``key``'s flat buffer (made on first use, uninitialised) that holds this fragment,
    also recorded as the fragment's optimizer state (what ``map_to_flat_opt_states`` leaves there)."""
    if key not in flat:
        flat[key] = torch.empty_like(hp)
    slot = flat[key].narrow(0, hp_address.start, hp_address.numel)
    mapping.optim_fragment[key] = slot
    return slot


def _zero_gaps(buffers, covered, numel: int):
    """Zero what no fragment filled (the group's alignment padding), as a zero-initialised buffer has."""
    at, gaps = 0, []
    for start, n in sorted(covered):
        if start > at:
            gaps.append((at, start - at))
        at = max(at, start + n)
    if at < numel:
        gaps.append((at, numel - at))
    for buffer in buffers:
        for start, n in gaps:
            buffer.narrow(0, start, n).zero_()


def _current_moments(state: Dict[str, Any], mapping) -> Dict[str, torch.Tensor]:
    """A parameter the checkpoint lacks keeps the optimizer's own moments (zeros before the first step)."""
    hp_fragment = mapping.get_hp_fragment()
    address = mapping.get_hp_fragment_address()
    out = {}
    for key in C.TENSOR_STATES:
        if key == C.FP32_WEIGHT_KEY:
            continue
        value = state.get(key)
        out[key] = value.narrow(0, address.start, address.numel).clone() if torch.is_tensor(value) \
            else torch.zeros_like(hp_fragment)
    return out


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
        raise InvalidCheckpointError(f"parameter {name}: the checkpoint's shard {list(smap.shard_shape)} does not match the "
                              f"target's {list(param.ds_shape)}", path=_state_path(files.folder, name, state))
    out = torch.zeros(size, dtype=tensor.torch_dtype)
    out[:length] = read_flat(tensor, smap, start, length)
    return out


def _load_stage3(optimizer, files: StateFiles, saved_groups, step, with_optimizer: bool, missing: Set[str]):
    """Each sub-group's flat fp32 partition (and, ``with_optimizer``, its moments, step and the groups'
    hyperparameters), then the bit16 partitions from it. A parameter in ``missing`` keeps its values."""
    states = C.TENSOR_STATES if with_optimizer else (C.FP32_WEIGHT_KEY,)
    for state in states:
        for sub_group, params in enumerate(optimizer.fp16_groups):
            flat = optimizer.fp32_partitioned_groups_flat[sub_group]
            current = flat if state == C.FP32_WEIGHT_KEY else optimizer.optimizer.state.get(flat, {}).get(state)
            values = torch.zeros_like(flat)
            offset = 0
            for param in params:
                numel = param.partition_numel()
                if optimizer.param_names[param] in missing:
                    if torch.is_tensor(current):
                        values.narrow(0, offset, numel).copy_(current.narrow(0, offset, numel))
                else:
                    values.narrow(0, offset, numel).copy_(_stage3_partition(optimizer, param, files, state))
                offset += numel
            if state == C.FP32_WEIGHT_KEY:
                flat.data.copy_(values)
                if step is not None and with_optimizer:
                    optimizer.optimizer.state[flat][C.STEP_KEY] = _as_step(step, optimizer.optimizer.state[flat])
            else:
                optimizer.optimizer.state[flat][state] = values
    if with_optimizer:
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
            raise InvalidCheckpointError(f"{'frozen parameter' if is_param else 'buffer'} {name}: checkpoint shape "
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


def _trainable(optimizer, stage3: bool) -> List[Any]:
    groups = optimizer.fp16_groups if stage3 else _lp_groups(optimizer)
    return [param for params in groups for param in params]


def _numel(tensor) -> int:
    return int(getattr(tensor, "ds_numel", tensor.numel()))


def _saved_names(folder: str) -> List[str]:
    zero = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER)
    return sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n)))


def _check_engine(optimizer, stage3: bool):
    if not stage3 and _lp_groups(optimizer) is None:
        raise UnsupportedEngineError(f"engine optimizer {type(optimizer).__name__} is not a ZeRO-1/2/3 or BF16 "
                                     "optimizer", fix="enable zero_optimization (stage 1, 2 or 3) or bf16 in the "
                                                      "DeepSpeed config")
    if stage3 and getattr(optimizer, "swap_optimizer", False):
        raise UnsupportedEngineError("NVMe optimizer offload is not supported by uckpt.load_into_engine",
                                     fix="load with DeepSpeed's engine.load_checkpoint(load_universal=True)")


def _names_agreed(engine, optimizer, load_dir: str, tag: Optional[str]):
    """Every rank finds the folder, checks the engine and lists its own names, then one collective: a
    rank's failure stops every rank with that cause (none is left waiting), and all ranks see every
    rank's missing parameters and names (a pipeline stage holds its own layers only), so a strict
    refusal happens on all of them."""
    import torch.distributed as dist

    error, folder, files, stage3, missing, known, saved = None, None, None, False, [], set(), set()
    try:
        folder = resolve_folder(load_dir, tag)
        files = StateFiles(folder)
        stage3 = _is_stage3(optimizer)
        _check_engine(optimizer, stage3)
        saved = set(_saved_names(files.folder))
        missing = [optimizer.param_names[p] for p in _trainable(optimizer, stage3)
                   if optimizer.param_names[p] not in saved and _numel(p) > 0]
        known = {n for n, _ in engine.module.named_parameters(remove_duplicate=False)}
        known |= {n for n, _ in engine.module.named_buffers(remove_duplicate=False)}
    except Exception as exc:  # noqa: BLE001 - agreed below
        error = exc
    mine = (None if error is None else f"{type(error).__name__}: {error}", missing, sorted(known))
    everyone = [mine]
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    if error is not None:
        raise error
    for rank, (remote, _, _) in enumerate(everyone):
        if remote is not None:
            raise RemoteError(f"loader rank {rank} failed: {remote}")
    missing = sorted({n for _, m, _ in everyone for n in m})
    known = {n for _, _, names in everyone for n in names}
    return folder, files, stage3, missing, _unexpected(files, saved, known)


def _unexpected(files: StateFiles, saved, known) -> List[str]:
    """Folders of the checkpoint (``saved``) naming no parameter or buffer of the target on any rank."""
    unexpected = []
    for name in sorted(saved - known):
        path = _state_path(files.folder, name, C.FP32_WEIGHT_KEY)
        if not os.path.isfile(path) or files.open_path(path)[0].numel() > 0:
            unexpected.append(name)
    return unexpected


def _strict_error(folder: str, missing: Sequence[str], unexpected: Sequence[str]) -> InvalidCheckpointError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) of the target have no folder in the checkpoint: "
                     f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"{len(unexpected)} folder(s) of the checkpoint name nothing in the target: "
                     f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    return InvalidCheckpointError("; ".join(parts), path=os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER),
                                  fix="load into the model the checkpoint was saved from, or pass "
                                      "load_module_strict=False to load the parameters both have")


def _is_expert(param) -> bool:
    return getattr(param, C.DS_AUTOEP_UC_META, None) is not None or getattr(param, "allreduce", True) is False


def _precheck(optimizer, files: StateFiles, stage3: bool, missing: Set[str]):
    """Every rank checks every trainable parameter before touching the engine, so a missing folder or
    a shape mismatch fails on all ranks alike instead of leaving some waiting in a collective. Expert
    parameters go first: a changed expert count also changes the router's shape, and the expert
    count is the cause to name (as DeepSpeed does)."""
    from deepspeed.runtime.base_optimizer import _get_universal_checkpoint_ep_info

    tp = (0, 1) if stage3 else _tp_info(optimizer)
    ep = None if stage3 else _get_universal_checkpoint_ep_info()
    params = sorted(_trainable(optimizer, stage3), key=lambda p: not _is_expert(p))
    for param in params:
        name = optimizer.param_names[param]
        if name in missing:
            continue
        pfolder = _param_folder(files.folder, name)
        if C.FP32_WEIGHT_KEY not in _state_keys(pfolder):
            raise CheckpointError(f"parameter {name} has no fp32.pt", path=pfolder,
                                  fix="the Universal folder is incomplete; convert again")
        tensor, info = files.open(name, C.FP32_WEIGHT_KEY)
        shape = tuple(param.ds_shape) if stage3 else tuple(param.shape)
        smap = shard_map(tensor.shape, info, _target(param, name, shape, tp, ep or _stage3_ep(param)),
                         C.FP32_WEIGHT_KEY)
        if smap.numel != torch.Size(shape).numel() and not getattr(param, C.DS_AUTOTP_UC_META, None):
            raise InvalidCheckpointError(f"parameter {name}: checkpoint shape {list(tensor.shape)} gives this rank "
                                         f"{list(smap.shard_shape)}, the target parameter is {list(shape)}",
                                         path=pfolder, fix="load into a model of the same architecture")


class LoadResult(tuple):
    """What ``engine.load_checkpoint`` returns, ``(load_path, client_state)``, so it unpacks the same,
    plus :attr:`report`: uckpt's account of the load (folder, bytes read, what was restored)."""

    def __new__(cls, load_path: Optional[str], client_state: Dict[str, Any], report: Dict[str, Any]):
        out = super().__new__(cls, (load_path, client_state))
        out.report = report
        return out

    @property
    def load_path(self) -> Optional[str]:
        return self[0]

    @property
    def client_state(self) -> Dict[str, Any]:
        return self[1]


# the model-state keys DeepSpeed's _load_checkpoint keeps out of the client state (DeepSpeed 0.19.8)
_ENGINE_KEYS = ("module", "skipped_steps", "global_steps", "dp_world_size", "mp_world_size", "data_sampler",
                "random_ltd")


def _client_state(checkpoint: Dict[str, Any], module_only: bool, lr_scheduler: bool,
                  optimizer_states: bool) -> Dict[str, Any]:
    """The client state DeepSpeed returns for the same flags: every key it does not consume itself."""
    consumed = {C.MODULE_KEY} if module_only else set(_ENGINE_KEYS)
    if lr_scheduler:
        consumed.add("lr_scheduler")
    if optimizer_states:
        consumed.add("optimizer")
    return {k: _loaded(v) for k, v in checkpoint.items() if k not in consumed}


def _loaded(value):
    """Tensors of the client state read in full (the rest of the file stays unread)."""
    return map_leaves(value, lambda x: x.load() if isinstance(x, ranged.FileTensor) else x)


def load_into_engine(engine, load_dir: str, tag: Optional[str] = None, config: Optional[str] = None, *,
                     load_module_strict: Optional[bool] = None, load_optimizer_states: Optional[bool] = None,
                     load_lr_scheduler_states: Optional[bool] = None, load_module_only: Optional[bool] = None,
                     **options: Any) -> LoadResult:
    """Restore ``engine`` (ZeRO stage 1, 2 or 3; any DP / TP / EP size) from a Universal checkpoint.

    Every rank calls it. The four ``load_*`` flags mean what they mean to DeepSpeed's
    ``engine.load_checkpoint`` (``None``: the config's value, by default ``True, True, True, False``):

    - ``load_optimizer_states=False`` restores the fp32 masters and the model's weights, the step
      counters and (``load_lr_scheduler_states``) the LR scheduler, and leaves the optimizer as it was
      initialised: no moment file is read. DeepSpeed 0.19.8's ZeRO-1/2 universal path ignores this
      flag and restores the moments anyway; its ZeRO-3 path honours it, as uckpt does for every stage.
    - ``load_module_only=True`` restores the weights only: no optimizer state, LR scheduler or counters.
    - ``load_module_strict=False`` loads the parameters both sides have; target parameters without a
      folder keep their values and checkpoint folders naming nothing in the target are skipped, both
      named in the report and a warning. ``True`` refuses either (DeepSpeed's universal path fails on
      a missing folder and ignores extra ones).

    ``config`` is an omegaconf YAML of :class:`uckpt.options.LoadConfig` keys; ``options`` override it.
    Returns :class:`LoadResult`: ``(load_path, client_state)`` as DeepSpeed returns them (the
    model-state file read and its keys DeepSpeed does not consume), with ``.report`` holding uckpt's
    account. Every file is read safely: objects of classes outside DeepSpeed's checkpoint classes come
    back as inert stand-ins, unless ``trust_checkpoint=True`` (UNSAFE: it runs whatever code the
    model-state file names) unpickles the client state fully. Shape and expert-count mismatches raise
    :class:`uckpt.errors.InvalidCheckpointError`, a ``ValueError`` as in DeepSpeed.
    """
    from .. import options as optmod
    from ..dsformat.compat import check_deepspeed

    check_deepspeed()
    flags = {"load_module_strict": load_module_strict, "load_optimizer_states": load_optimizer_states,
             "load_lr_scheduler_states": load_lr_scheduler_states, "load_module_only": load_module_only,
             "tag": tag}
    values = dict(options, **{k: v for k, v in flags.items() if v is not None})
    cfg = optmod.build(config, values=values, schema=optmod.LoadConfig)
    with_optimizer = cfg.load_optimizer_states and not cfg.load_module_only
    before = IO.snapshot()
    optimizer = engine.optimizer
    folder, files, stage3, missing, unexpected = _names_agreed(engine, optimizer, load_dir, cfg.tag)
    if cfg.load_module_strict and (missing or unexpected):
        raise _strict_error(folder, missing, unexpected)
    if missing or unexpected:
        logger.warning("uckpt: loading %s with load_module_strict=False: target parameters kept as they are: %s; "
                       "checkpoint folders skipped: %s", folder, missing or "none", unexpected or "none")
    _precheck(optimizer, files, stage3, set(missing))
    model_file = _model_state_file(folder, getattr(engine, "checkpoint_mp_rank", 0) or 0,
                                   max(1, getattr(engine, "mp_world_size", 1) or 1))
    # the engine-level scalars only: the file's module weights stay unread
    checkpoint = materialize(ranged.open_lazy(model_file), deepspeed_classes()) if model_file else {}
    if hasattr(optimizer, "checkpoint_event_prologue"):
        optimizer.checkpoint_event_prologue()

    optim_sd = _optimizer_state(folder) if with_optimizer else {}
    saved_groups, zero3_step = _saved_groups_and_step(optim_sd)
    if stage3:
        step = zero3_step if zero3_step is not None else _first_step(folder) if with_optimizer else None
        if with_optimizer and hasattr(optimizer, "_load_global_state_stage3"):
            optimizer._load_global_state_stage3(optim_sd)
        _load_stage3(optimizer, files, saved_groups, step, with_optimizer, set(missing))
    else:
        if with_optimizer and (C.DS_VERSION in optim_sd or not hasattr(optimizer, "partition_gradients")):
            optimizer._load_global_state(optim_sd)
        _load_zero12(optimizer, files, zero3_step, with_optimizer, set(missing), cfg.threads)
        if with_optimizer:
            _apply_hyperparameters(optimizer.optimizer.param_groups, saved_groups)

    extras = _restore_module_extras(engine, files, stage3, _tp_info(optimizer) if not stage3 else (0, 1)) \
        if cfg.module_extras else {}
    if hasattr(optimizer, "checkpoint_event_epilogue"):
        optimizer.checkpoint_event_epilogue()
    if not stage3:
        optimizer.update_lp_params()

    engine.loaded_checkpoint_dp_world_size = checkpoint.get("dp_world_size")
    if checkpoint and not cfg.load_module_only:
        if cfg.load_lr_scheduler_states and engine.lr_scheduler is not None and checkpoint.get("lr_scheduler"):
            engine.lr_scheduler.load_state_dict(_loaded(checkpoint["lr_scheduler"]))
        engine.global_steps = checkpoint.get("global_steps", engine.global_steps)
        engine.global_samples = checkpoint.get("global_samples", engine.global_steps * engine.train_batch_size())
        engine.skipped_steps = checkpoint.get("skipped_steps", engine.skipped_steps)
        engine.loaded_checkpoint_mp_world_size = checkpoint.get("mp_world_size")
    if cfg.trust_checkpoint and model_file:  # unsafe by choice: the caller trusts the file's code
        checkpoint = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
    client = _client_state(checkpoint, cfg.load_module_only, cfg.load_lr_scheduler_states, cfg.load_optimizer_states)
    report = {"folder": folder, "bytes_read": IO.since(before)["read_bytes"], "module_extras": extras,
              "stage3": stage3, "optimizer_states": with_optimizer, "module_only": cfg.load_module_only,
              "missing": missing, "unexpected": unexpected}
    return LoadResult(model_file, client, report)
