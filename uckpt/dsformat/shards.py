"""Open native shards lazily and pull out the small metadata the plan needs.

:func:`uckpt.ranged.open_lazy` parses only each shard's pickle: tensors stay on disk as
:class:`~uckpt.ranged.FileTensor` (where their bytes are), and a fragment is read with one
``pread`` straight into the buffer that assembles its parameter. A rank therefore reads the
bytes it forwards and nothing else, holds no mapping of the shard, and needs no torch.
Metadata extraction returns plain data (``ModelMeta`` / ``OptimMeta``), which ranks exchange to
build one index.
"""
import pickle
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from . import constants as C
from ..errors import CheckpointError, UnsupportedCheckpointError
from ..torchsave.reader import FileDescriptors, FileTensor, open_lazy
from ..torchsave.writer import payload_bytes
from ..torchsave.zipfmt import verify_crc
from ..regions import Kind, Source, SourceKind
from .checked import Checked
from .files import Family


def load_shard(path: str, stand_ins: Optional[Set[str]] = None) -> Dict[str, Any]:
    """A DeepSpeed shard with its tensors left in the file, read safely (``stand_ins`` collects the
    globals it names that became inert stand-ins); a clear CheckpointError if it is truncated, corrupt
    or inconsistent."""
    try:
        return open_lazy(path, stand_ins)
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot be read, the file is truncated or corrupt ({type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0][:160]})", path,
                              "copy the file again from the training job's save directory, or use an earlier tag") from None


DP_WORLD_SIZE_KEY = "dp_world_size"  # model-state file keys of the saving run's sizes (engine._save_checkpoint)
MP_WORLD_SIZE_KEY = "mp_world_size"


@dataclass
class ModelMeta:
    """What the plan needs from one model-state file (no weights)."""

    param_shapes: Optional[List[Dict[str, Tuple[int, ...]]]]
    module_shapes: Dict[str, Tuple[int, ...]]  # module state_dict keys (params + buffers), in order
    module_nbytes: Dict[str, int]  # their sizes as saved (what writing a fp32-only folder reads)
    frozen_param_shapes: Dict[str, Tuple[int, ...]]
    shared_params: Dict[str, str]
    uc_info: Optional[Dict[str, Any]]
    parallel_dims: Optional[Dict[str, int]]
    ds_version: Optional[str]
    global_steps: Optional[int]
    skipped_steps: Optional[int]
    has_autoep: bool
    autoep_layers: Optional[List[Dict[str, Any]]] = None  # ds_autoep_layers (or the legacy autoep_layers)
    use_data_before_expert_parallelism: Any = False  # from the saved ds_config
    dp_world_size: Optional[int] = None  # the saving run's sizes, which say which shard files exist
    mp_world_size: Optional[int] = None
    tensor_bytes: int = 0  # every tensor the file's dict holds, as the writer counts them when it rewrites it


@dataclass
class GroupMeta:
    """One flat optimizer group (ZeRO-1/2 param group, or ZeRO-3 sub-group) of one optimizer file."""

    fp32_numel: int
    state_numels: Dict[str, int]  # tensor states (exp_avg, exp_avg_sq, ...) -> length
    step: Any = None
    has_step: bool = False
    mappings: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # ZeRO-1/2: name -> (start, numel)
    partition_count: Optional[int] = None  # ZeRO-3 (ds_zero_partition_groups)
    partition_rank: Optional[int] = None
    missing: Tuple[str, ...] = ()  # moments the group does not hold
    refusal: Optional[str] = None  # why that makes its (non-expert) parameters unconvertible


class OptimizerKind(Kind):
    """Which DeepSpeed optimizer wrapper wrote an optimizer shard."""

    ZERO12 = "zero12"  # DeepSpeedZeroOptimizer (stage 1 or 2)
    BF16_OPTIMIZER = "bf16_optimizer"  # BF16_Optimizer: no zero_stage key (DeepSpeed's converter assumes 1)
    ZERO3 = "zero3"  # DeepSpeedZeroOptimizer_Stage3


@dataclass
class OptimMeta:
    zero_stage: int
    groups: List[GroupMeta]
    elastic: bool = False
    optimizer_kind: Optional[OptimizerKind] = None


def model_meta(sd: Dict[str, Any], path: str) -> ModelMeta:
    c = Checked(path)
    sd = c.dict(sd, "the saved object")
    if C.PARAM_SHAPES not in sd and C.MODULE_KEY not in sd:
        raise CheckpointError("is not a DeepSpeed model-state file (no 'module' / 'param_shapes' keys)", path,
                              "pass a folder written by engine.save_checkpoint")
    module = c.dict(sd.get(C.MODULE_KEY), f"'{C.MODULE_KEY}'", optional=True) or {}
    param_shapes = c.list(sd.get(C.PARAM_SHAPES), f"'{C.PARAM_SHAPES}'", optional=True)
    if param_shapes is not None:
        param_shapes = [c.shapes(g, f"'{C.PARAM_SHAPES}'[{i}]") for i, g in enumerate(param_shapes)]
    shared = c.dict(sd.get(C.SHARED_PARAMS_KEY), f"'{C.SHARED_PARAMS_KEY}'", optional=True) or {}
    ds_config = c.dict(sd.get(C.DS_CONFIG_KEY), f"'{C.DS_CONFIG_KEY}'", optional=True)  # DeepSpeed reads it as one
    tensors = {c.str(k, f"a '{C.MODULE_KEY}' key"): c.tensor(v, f"'{C.MODULE_KEY}'[{k!r}]") for k, v in module.items()}
    return ModelMeta(
        param_shapes=param_shapes,
        module_shapes={k: t.shape for k, t in tensors.items()},
        module_nbytes={k: t.nbytes for k, t in tensors.items()},
        frozen_param_shapes=c.shapes(sd.get(C.FROZEN_PARAM_SHAPES), f"'{C.FROZEN_PARAM_SHAPES}'"),
        shared_params={c.str(k, f"a '{C.SHARED_PARAMS_KEY}' key"): c.str(v, f"'{C.SHARED_PARAMS_KEY}'[{k!r}]")
                       for k, v in shared.items()},
        uc_info=c.dict(sd.get(C.UNIVERSAL_CHECKPOINT_INFO), f"'{C.UNIVERSAL_CHECKPOINT_INFO}'", optional=True),
        parallel_dims=_parallel_dims(c, sd.get(C.CHECKPOINT_PARALLEL_DIMS)),
        ds_version=sd.get(C.DS_VERSION),
        global_steps=c.int(sd.get("global_steps"), "'global_steps'", optional=True),
        skipped_steps=c.int(sd.get("skipped_steps"), "'skipped_steps'", optional=True),
        has_autoep=sd.get(C.AUTOEP_LAYERS_KEY) is not None or sd.get(C.AUTOEP_LAYERS_KEY_LEGACY) is not None,
        autoep_layers=sd.get(C.AUTOEP_LAYERS_KEY, sd.get(C.AUTOEP_LAYERS_KEY_LEGACY)),
        use_data_before_expert_parallelism=ds_config.get(C.USE_DATA_BEFORE_EXPERT_PARALLELISM, False)
        if isinstance(ds_config, dict) else None,
        dp_world_size=c.int(sd.get(DP_WORLD_SIZE_KEY), f"'{DP_WORLD_SIZE_KEY}'", optional=True),
        mp_world_size=c.int(sd.get(MP_WORLD_SIZE_KEY), f"'{MP_WORLD_SIZE_KEY}'", optional=True),
        tensor_bytes=payload_bytes(sd),
    )


def _parallel_dims(c: Checked, dims: Any) -> Optional[Dict[str, int]]:
    """The saving run's pipeline and tensor-parallel degrees, when recorded: both, as positive ints
    (DeepSpeed's converter reads both and fails without them)."""
    where = f"'{C.CHECKPOINT_PARALLEL_DIMS}'"
    if c.dict(dims, where, optional=True) is None:
        return None
    out = {key: c.int(dims.get(key), f"{where}['{key}']") for key in (C.CHECKPOINT_PP_DEGREE, C.CHECKPOINT_TP_DEGREE)}
    for key, value in out.items():
        if value < 1:
            c.fail(f"{where}['{key}']", f"is {value}, not a positive degree")
    return out


def _optimizer_state(sd: Dict[str, Any], path: str) -> Dict[str, Any]:
    osd = sd.get(C.OPTIMIZER_STATE_DICT) if isinstance(sd, dict) else None
    if osd is None:
        raise CheckpointError(f"is not a DeepSpeed ZeRO optimizer file (no '{C.OPTIMIZER_STATE_DICT}' key)", path,
                              "pass a folder written by engine.save_checkpoint with ZeRO enabled")
    return Checked(path).dict(osd, f"'{C.OPTIMIZER_STATE_DICT}'")


def _group_states(c: Checked, state: Dict[str, Any], where: str, g: int) \
        -> Tuple[Dict[str, int], Any, bool, Tuple[str, ...], Optional[str]]:
    """A group's moment lengths, step, and the moments it lacks with the refusal DeepSpeed's rule implies
    (the index refuses them unless the group holds only AutoEP experts, which are converted best effort)."""
    tensors = {k: c.tensor(state[k], f"{where}[{k!r}]", flat=True).numel() for k in C.MOMENT_STATES if k in state}
    missing = tuple(k for k in C.MOMENT_STATES if k not in tensors)
    refusal = None
    if missing:
        have = sorted(map(str, state)) or ["nothing"]
        refusal = (f"optimizer group {g} holds {', '.join(have)} but not {', '.join(missing)}: the Universal format "
                   "stores Adam-family moments (exp_avg, exp_avg_sq); other optimizers, and saves made before the "
                   "first optimizer step, cannot be converted")
    step = state.get(C.STEP_KEY)
    if C.STEP_KEY in state and not isinstance(step, (int, float, FileTensor)) or isinstance(step, bool):
        c.fail(f"{where}['{C.STEP_KEY}']", f"is a {type(step).__name__}, not a number or a tensor")
    if isinstance(step, FileTensor) and step.numel() != 1:  # DeepSpeed's converter reads it as one value
        c.fail(f"{where}['{C.STEP_KEY}']", f"is a tensor of {step.numel()} elements, not one step value")
    return tensors, _value(step), C.STEP_KEY in state, missing, refusal


def _group(c: Checked, flat: Any, flat_where: str, states: Any, states_where: str, g: int):
    """Group ``g`` of an optimizer shard: its flat fp32 tensor (checked) and its moments and step."""
    t = c.tensor(flat, f"{flat_where}[{g}]", flat=True)
    return (t,) + _group_states(c, c.item(states, g, states_where), f"{states_where}[{g}]", g)


def _value(v):
    """A small tensor (the step) read into memory: it travels in the metadata and is written as ``step.pt``."""
    return v.to_data() if isinstance(v, FileTensor) else v


def check_integrity(path: str) -> int:
    """Every record of a shard file against its CRC-32 (one streamed pass); the bytes checked."""
    try:
        return verify_crc(path)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"is damaged: {(str(exc).splitlines() or [''])[0][:200]}", path,
                              "copy the file again from the training job's save directory, or use an earlier tag") \
            from None


def optim_meta(sd: Dict[str, Any], path: str, family: Family) -> OptimMeta:
    c = Checked(path)
    osd = _optimizer_state(sd, path)
    top = f"'{C.OPTIMIZER_STATE_DICT}'"
    if family is Family.ZERO3:
        inner = osd.get(C.OPTIMIZER_STATE_DICT)
        flat = osd.get(C.FP32_FLAT_GROUPS)
        if inner is None or flat is None:
            raise CheckpointError("is not a ZeRO-3 optimizer file (no fp32_flat_groups)", path,
                                  "the folder mixes files of different ZeRO stages; keep the files of one save only")
        inner = c.dict(inner, f"{top}.{C.OPTIMIZER_STATE_DICT}")
        flat = c.list(flat, f"{top}.{C.FP32_FLAT_GROUPS}")
        pgroups = c.list(osd.get(C.ZERO3_PARTITION_GROUPS_KEY), f"{top}.{C.ZERO3_PARTITION_GROUPS_KEY}",
                         optional=True) or []
        state_where = f"{top}.{C.OPTIMIZER_STATE_DICT}.{C.TORCH_STATE_KEY}"
        groups = []
        for k, t in enumerate(flat):
            t, numels, step, has_step, missing, refusal = _group(c, t, f"{top}.{C.FP32_FLAT_GROUPS}",
                                                                 inner.get(C.TORCH_STATE_KEY), state_where, k)
            pg = c.dict(pgroups[k], f"{top}.{C.ZERO3_PARTITION_GROUPS_KEY}[{k}]") if k < len(pgroups) else {}
            where = f"{top}.{C.ZERO3_PARTITION_GROUPS_KEY}[{k}]"
            groups.append(GroupMeta(t.numel(), numels, step, has_step,
                                    partition_count=c.int(pg.get(C.ZERO3_PARTITION_COUNT_KEY), where, optional=True),
                                    partition_rank=c.int(pg.get(C.ZERO3_PARTITION_RANK_KEY), where, optional=True),
                                    missing=missing, refusal=refusal))
        return OptimMeta(c.int(osd.get(C.ZERO_STAGE, 3), f"{top}.{C.ZERO_STAGE}"), groups,
                         optimizer_kind=OptimizerKind.ZERO3)

    if C.SINGLE_PARTITION_OF_FP32_GROUPS not in osd:
        stage = osd.get(C.ZERO_STAGE)
        raise CheckpointError(f"is not a ZeRO-1/2 optimizer file (zero_stage={stage}, no "
                              f"{C.SINGLE_PARTITION_OF_FP32_GROUPS})", path,
                              "the folder mixes files of different ZeRO stages; keep the files of one save only")
    base = osd.get(C.BASE_OPTIMIZER_STATE)
    if isinstance(base, list):
        raise UnsupportedCheckpointError(
            "is an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint); neither DeepSpeed's converter "
            "nor uckpt reads that layout", path, "save with elastic_checkpoint disabled")
    base = c.dict(base, f"{top}.{C.BASE_OPTIMIZER_STATE}")
    fp32 = c.list(osd[C.SINGLE_PARTITION_OF_FP32_GROUPS], f"{top}.{C.SINGLE_PARTITION_OF_FP32_GROUPS}")
    mappings = osd.get(C.PARAM_SLICE_MAPPINGS)
    if mappings is None:
        raise CheckpointError(f"has no {C.PARAM_SLICE_MAPPINGS} (written by DeepSpeed older than 0.10)", path,
                              "re-save the checkpoint with a current DeepSpeed")
    mappings = c.list(mappings, f"{top}.{C.PARAM_SLICE_MAPPINGS}")
    if len(mappings) != len(fp32):
        c.fail(f"{top}.{C.PARAM_SLICE_MAPPINGS}", f"has {len(mappings)} groups, "
               f"{C.SINGLE_PARTITION_OF_FP32_GROUPS} has {len(fp32)}")
    state_where = f"{top}.{C.BASE_OPTIMIZER_STATE}.{C.TORCH_STATE_KEY}"
    groups = []
    for g, t in enumerate(fp32):
        t, numels, step, has_step, missing, refusal = _group(c, t, f"{top}.{C.SINGLE_PARTITION_OF_FP32_GROUPS}",
                                                             base.get(C.TORCH_STATE_KEY), state_where, g)
        where = f"{top}.{C.PARAM_SLICE_MAPPINGS}[{g}]"
        maps = {}
        for name, a in c.dict(mappings[g], where).items():
            try:
                maps[c.str(name, f"a {where} key")] = (c.int(a.start, f"{where}[{name!r}].start"),
                                                       c.int(a.numel, f"{where}[{name!r}].numel"))
            except AttributeError:
                c.fail(f"{where}[{name!r}]", f"is {type(a).__name__}, not a fragment address (start, numel)")
        groups.append(GroupMeta(t.numel(), numels, step, has_step, mappings=maps, missing=missing, refusal=refusal))
    # The BF16_Optimizer variant carries no zero_stage; DeepSpeed's converter then assumes stage 1.
    return OptimMeta(c.int(osd.get(C.ZERO_STAGE, 1), f"{top}.{C.ZERO_STAGE}"), groups,
                     optimizer_kind=OptimizerKind.ZERO12 if C.ZERO_STAGE in osd else OptimizerKind.BF16_OPTIMIZER)


def state_tensor(sd: Dict[str, Any], family: Family, group: int, state: str) -> FileTensor:
    """The flat tensor of ``state`` (fp32 / exp_avg / exp_avg_sq) for ``group`` of an optimizer shard
    (its type was checked with the shard's metadata)."""
    osd = sd[C.OPTIMIZER_STATE_DICT]
    if family is Family.ZERO3:
        if state == C.FP32_WEIGHT_KEY:
            return osd[C.FP32_FLAT_GROUPS][group]
        return osd[C.OPTIMIZER_STATE_DICT][C.TORCH_STATE_KEY][group][state]  # a dict or a list of groups
    if state == C.FP32_WEIGHT_KEY:
        return osd[C.SINGLE_PARTITION_OF_FP32_GROUPS][group]
    return osd[C.BASE_OPTIMIZER_STATE][C.TORCH_STATE_KEY][group][state]


def read_fragment(sd: Dict[str, Any], family: Family, frag, state: str, out: memoryview, fds: FileDescriptors = None):
    """Copy a fragment's fp32 elements of ``state`` from its shard into ``out`` (``frag.numel`` * 4 bytes)."""
    tensor = state_tensor(sd, family, frag.group, state)
    if tensor.dtype != "float32":
        raise CheckpointError(f"optimizer state {state} of group {frag.group} is {tensor.dtype}, not float32",
                              tensor.path, "DeepSpeed keeps fp32 master weights and moments; re-save the checkpoint")
    tensor.read_into(out, frag.start, fds)


@contextmanager
def opened_checkpoint(files):
    """Every shard of ``files`` opened lazily in this one process, with its metadata (inspect, verify)."""
    shards = {s.index: load_shard(s.path) for s in files.sources}
    yield shards, {s.index: source_meta(s, shards[s.index], files.family) for s in files.sources}


def source_meta(source: Source, sd: Dict[str, Any], family: Family):
    return model_meta(sd, source.path) if source.kind is SourceKind.MODEL else optim_meta(sd, source.path, family)


