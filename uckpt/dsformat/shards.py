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
from ..regions import Kind, Source, SourceKind
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


@dataclass
class ModelMeta:
    """What the plan needs from one model-state file (no weights)."""

    param_shapes: Optional[List[Dict[str, Tuple[int, ...]]]]
    module_shapes: Dict[str, Tuple[int, ...]]  # module state_dict keys (params + buffers), in order
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


def _shapes(d) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v) for k, v in (d or {}).items()}


def model_meta(sd: Dict[str, Any], path: str) -> ModelMeta:
    module = sd.get(C.MODULE_KEY)
    if C.PARAM_SHAPES not in sd and C.MODULE_KEY not in sd:
        raise CheckpointError("is not a DeepSpeed model-state file (no 'module' / 'param_shapes' keys)", path,
                              "pass a folder written by engine.save_checkpoint")
    param_shapes = sd.get(C.PARAM_SHAPES)
    if param_shapes is not None:
        param_shapes = [_shapes(g) for g in param_shapes]
    return ModelMeta(
        param_shapes=param_shapes,
        module_shapes=_shapes({k: v.shape for k, v in module.items()}) if isinstance(module, dict) else {},
        frozen_param_shapes=_shapes(sd.get(C.FROZEN_PARAM_SHAPES)),
        shared_params=dict(sd.get(C.SHARED_PARAMS_KEY) or {}),
        uc_info=sd.get(C.UNIVERSAL_CHECKPOINT_INFO),
        parallel_dims=sd.get(C.CHECKPOINT_PARALLEL_DIMS),
        ds_version=sd.get(C.DS_VERSION),
        global_steps=sd.get("global_steps"),
        skipped_steps=sd.get("skipped_steps"),
        has_autoep=sd.get(C.AUTOEP_LAYERS_KEY) is not None or sd.get(C.AUTOEP_LAYERS_KEY_LEGACY) is not None,
        autoep_layers=sd.get(C.AUTOEP_LAYERS_KEY, sd.get(C.AUTOEP_LAYERS_KEY_LEGACY)),
        use_data_before_expert_parallelism=(sd.get(C.DS_CONFIG_KEY) or {}).get(
            C.USE_DATA_BEFORE_EXPERT_PARALLELISM, False) if isinstance(sd.get(C.DS_CONFIG_KEY), dict) else None,
    )


def _optimizer_state(sd: Dict[str, Any], path: str) -> Dict[str, Any]:
    osd = sd.get(C.OPTIMIZER_STATE_DICT) if isinstance(sd, dict) else None
    if not isinstance(osd, dict):
        raise CheckpointError(f"is not a DeepSpeed ZeRO optimizer file (no '{C.OPTIMIZER_STATE_DICT}' key)", path,
                              "pass a folder written by engine.save_checkpoint with ZeRO enabled")
    return osd


def _group_states(state: Dict[str, Any], path: str, g: int) -> Tuple[Dict[str, int], Any, bool, Tuple[str, ...],
                                                                   Optional[str]]:
    """A group's moment lengths, step, and the moments it lacks with the refusal DeepSpeed's rule implies
    (the index refuses them unless the group holds only AutoEP experts, which are converted best effort)."""
    tensors = {k: v.numel() for k, v in state.items() if isinstance(v, FileTensor) and len(v.shape) == 1 and k != C.STEP_KEY}
    missing = tuple(k for k in C.MOMENT_STATES if k not in tensors)
    refusal = None
    if missing:
        have = sorted(state) or ["nothing"]
        refusal = (f"optimizer group {g} holds {', '.join(have)} but not {', '.join(missing)}: the Universal format "
                   "stores Adam-family moments (exp_avg, exp_avg_sq); other optimizers, and saves made before the "
                   "first optimizer step, cannot be converted")
    return ({k: tensors[k] for k in C.MOMENT_STATES if k in tensors}, _value(state.get(C.STEP_KEY)),
            C.STEP_KEY in state, missing, refusal)


def _value(v):
    """A small tensor (the step) read into memory: it travels in the metadata and is written as ``step.pt``."""
    return v.to_data() if isinstance(v, FileTensor) else v


def optim_meta(sd: Dict[str, Any], path: str, family: Family) -> OptimMeta:
    osd = _optimizer_state(sd, path)
    if family is Family.ZERO3:
        inner = osd.get(C.OPTIMIZER_STATE_DICT)
        flat = osd.get(C.FP32_FLAT_GROUPS)
        if not isinstance(inner, dict) or flat is None:
            raise CheckpointError("is not a ZeRO-3 optimizer file (no fp32_flat_groups)", path,
                                  "the folder mixes files of different ZeRO stages; keep the files of one save only")
        pgroups = osd.get(C.ZERO3_PARTITION_GROUPS_KEY) or []
        groups = []
        for k, t in enumerate(flat):
            numels, step, has_step, missing, refusal = _group_states(inner.get(C.TORCH_STATE_KEY, {}).get(k, {}),
                                                                     path, k)
            pg = pgroups[k] if k < len(pgroups) else {}
            groups.append(GroupMeta(t.numel(), numels, step, has_step, partition_count=pg.get(C.ZERO3_PARTITION_COUNT_KEY),
                                    partition_rank=pg.get(C.ZERO3_PARTITION_RANK_KEY), missing=missing,
                                    refusal=refusal))
        return OptimMeta(int(osd.get(C.ZERO_STAGE, 3)), groups, optimizer_kind=OptimizerKind.ZERO3)

    if C.SINGLE_PARTITION_OF_FP32_GROUPS not in osd:
        stage = osd.get(C.ZERO_STAGE)
        raise CheckpointError(f"is not a ZeRO-1/2 optimizer file (zero_stage={stage}, no "
                              f"{C.SINGLE_PARTITION_OF_FP32_GROUPS})", path,
                              "the folder mixes files of different ZeRO stages; keep the files of one save only")
    base = osd[C.BASE_OPTIMIZER_STATE]
    if isinstance(base, list):
        raise UnsupportedCheckpointError(
            "is an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint); neither DeepSpeed's converter "
            "nor uckpt reads that layout", path, "save with elastic_checkpoint disabled")
    fp32 = osd[C.SINGLE_PARTITION_OF_FP32_GROUPS]
    mappings = osd.get(C.PARAM_SLICE_MAPPINGS)
    if mappings is None:
        raise CheckpointError(f"has no {C.PARAM_SLICE_MAPPINGS} (written by DeepSpeed older than 0.10)", path,
                              "re-save the checkpoint with a current DeepSpeed")
    groups = []
    for g, t in enumerate(fp32):
        numels, step, has_step, missing, refusal = _group_states(base[C.TORCH_STATE_KEY].get(g, {}), path, g)
        maps = {name: (int(a.start), int(a.numel)) for name, a in mappings[g].items()}
        groups.append(GroupMeta(t.numel(), numels, step, has_step, mappings=maps, missing=missing, refusal=refusal))
    # The BF16_Optimizer variant carries no zero_stage; DeepSpeed's converter then assumes stage 1.
    return OptimMeta(int(osd.get(C.ZERO_STAGE, 1)), groups,
                     optimizer_kind=OptimizerKind.ZERO12 if C.ZERO_STAGE in osd else OptimizerKind.BF16_OPTIMIZER)


def state_tensor(sd: Dict[str, Any], family: Family, group: int, state: str) -> FileTensor:
    """The flat tensor of ``state`` (fp32 / exp_avg / exp_avg_sq) for ``group`` of an optimizer shard."""
    osd = sd[C.OPTIMIZER_STATE_DICT]
    if family is Family.ZERO3:
        if state == C.FP32_WEIGHT_KEY:
            return osd[C.FP32_FLAT_GROUPS][group]
        return osd[C.OPTIMIZER_STATE_DICT][C.TORCH_STATE_KEY][group][state]
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


