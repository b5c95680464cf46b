"""AutoEP (automatic expert parallelism) checkpoints: metadata, checks and where each expert's rows go.

Spec section 3. A ZeRO-1/2 AutoEP save keeps each EP rank's routed experts ``<prefix>.w1|w2|w3``
(local shape ``[E_local, ...]``) in the expert param groups of the ZeRO shards, partitioned over the
expert-data-parallel ranks of that EP rank. The converter rebuilds the full ``[E, ...]`` tensor:
the EP-local tensor of EP rank ``e`` is the concatenation of its owners' fragments in DP order
(DeepSpeed's ``_autoep_zero12_dp_ranks`` gives the owners for both
``use_data_before_expert_parallelism`` layouts), and its local row ``j`` is global expert
``placement[e][j]`` (contiguous ``e * E_local + j`` without a placement descriptor).

DIFFERENCE: DeepSpeed 0.19.8's converter drops ``expert_placement`` (spec 3.2) and always assumes
the contiguous layout; uckpt places rows by the descriptor when one is recorded. The two agree on
every contiguous placement, which is what DeepSpeed writes today.

Pure functions of file names and metadata, like the rest of the index.
"""
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import constants as C
from ..errors import AutoEPMetadataError, MissingExpertFileError, UnsupportedCheckpointError


@dataclass
class AutoEPInfo:
    """The AutoEP layers of a checkpoint, validated."""

    layers: List[Dict[str, Any]]  # the union of every model file's entries, in first-seen order
    params: Dict[str, Dict[str, Any]]  # "<prefix>.wK" -> its layer's entry
    data_before_ep: bool
    source: Dict[str, str] = field(default_factory=dict)  # prefix -> model file it was read from

    def lightweight(self) -> List[Dict[str, Any]]:
        """The entries as DeepSpeed's converter writes them into the output's UC info (spec 3.2)."""
        from deepspeed.checkpoint.deepspeed_checkpoint import AUTOEP_METADATA_FIELDS

        return [{k: entry[k] for k in AUTOEP_METADATA_FIELDS if k in entry} for entry in self.layers]


def collect(models: Sequence[Tuple[str, Any]], expert_files: Sequence[str], folder: str) -> Optional[AutoEPInfo]:
    """AutoEP metadata of the model files ``[(path, ModelMeta)]``; ``None`` for a checkpoint without AutoEP.

    Expert files without AutoEP metadata are native DeepSpeed-MoE / Megatron-DeepSpeed experts: the guide's
    rule is an error (DIFFERENCE: DeepSpeed 0.19.8's converter skips them silently and drops the experts).
    """
    by_prefix: Dict[str, Dict[str, Any]] = {}
    source: Dict[str, str] = {}
    flags: Dict[str, Any] = {}
    for path, meta in models:
        layers = meta.autoep_layers
        flags[path] = meta.use_data_before_expert_parallelism
        if layers is None:
            continue
        if not isinstance(layers, list):
            raise AutoEPMetadataError(f"AutoEP metadata ({C.AUTOEP_LAYERS_KEY}) is a {type(layers).__name__}, not a "
                                      "list", path, "the model-state file is damaged; copy it again")
        for entry in layers:
            prefix = entry.get(C.AUTOEP_EXPERT_KEY_PREFIX) if isinstance(entry, dict) else None
            if not isinstance(prefix, str) or not prefix:
                raise AutoEPMetadataError("an AutoEP layer entry has no expert_key_prefix", path,
                                          "the model-state file is damaged; copy it again")
            if prefix in by_prefix and by_prefix[prefix] != entry:
                raise AutoEPMetadataError(f"AutoEP metadata for {prefix!r} differs from {source[prefix]}", path,
                                          "the model files come from different saves; copy the tag folder again")
            if prefix not in by_prefix:
                by_prefix[prefix], source[prefix] = entry, path
    if not by_prefix:
        if expert_files:
            raise AutoEPMetadataError(
                f"holds {len(expert_files)} expert files (layer_*_expert_*) but no {C.AUTOEP_LAYERS_KEY} / "
                f"{C.AUTOEP_LAYERS_KEY_LEGACY} metadata: these are native DeepSpeed-MoE or Megatron-DeepSpeed "
                "experts, which a Universal checkpoint cannot describe", folder,
                "a model-specific migration step is needed (DeepSpeed's converter would silently drop the experts)")
        return None
    from deepspeed.checkpoint.autoep_universal import get_autoep_zero12_expert_param_info  # AutoEP only

    values = {v for v in flags.values()}
    if len(values) != 1 or not isinstance(next(iter(values)), bool):
        raise AutoEPMetadataError(f"use_data_before_expert_parallelism disagrees across model files or is not a "
                                  f"boolean: {flags}", folder, "the model files come from different saves")
    layers = list(by_prefix.values())
    try:
        params = get_autoep_zero12_expert_param_info(layers)  # DeepSpeed's own validation
    except RuntimeError as exc:
        raise AutoEPMetadataError(str(exc), next(iter(source.values())),
                                  "the AutoEP metadata is damaged; copy the model files again") from None
    return AutoEPInfo(layers, params, next(iter(values)), source)


def is_zero3_partitioned(layers: List[Dict[str, Any]]) -> bool:
    return any(entry.get(C.AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY) == C.AUTOEP_ZERO3_PARTITIONED_EXPERT_STATE_FORMAT
               for entry in layers if isinstance(entry, dict))


def check_expert_files(info: AutoEPInfo, expert_files: Sequence[str], folder: str):
    """Every (layer, expert) named by the metadata has exactly one per-expert model file (spec 3.2, step 5)."""
    found: Dict[Tuple[int, int], List[str]] = {}
    pattern = re.compile(rf"^layer_(\d+)_expert_(\d+)_{C.MODEL_FILE_PREFIX}\d+{C.MODEL_FILE_SUFFIX}$")
    for path in expert_files:
        m = pattern.match(os.path.basename(path))
        if m:
            found.setdefault((int(m.group(1)), int(m.group(2))), []).append(path)
    for entry in info.layers:
        layer = entry.get("moe_layer_id")
        for g in range(entry[C.AUTOEP_NUM_EXPERTS]):
            hits = found.get((layer, g), [])
            name = f"layer_{layer}_expert_{g}_{C.MODEL_FILE_PREFIX}*{C.MODEL_FILE_SUFFIX}"
            if not hits:
                raise MissingExpertFileError(f"the per-expert file {name} named by the AutoEP metadata of "
                                             f"{entry[C.AUTOEP_EXPERT_KEY_PREFIX]!r} is missing", folder,
                                             "copy the complete tag folder from the training job")
            if len(hits) > 1:
                raise UnsupportedCheckpointError(
                    f"has {len(hits)} files for layer {layer}, expert {g} ({', '.join(sorted(map(os.path.basename, hits)))}): "
                    "combined AutoEP + AutoTP topology changes are out of scope", folder,
                    "load this checkpoint with the topology it was saved at")


def owner_dp_ranks(ep_rank: int, dp: int, ep: int, data_before_ep: bool) -> List[int]:
    """The ZeRO DP ranks holding EP rank ``ep_rank``'s expert partitions, in DP order (DeepSpeed's rule)."""
    from deepspeed.checkpoint.autoep_universal import _autoep_zero12_dp_ranks

    try:
        return list(_autoep_zero12_dp_ranks(ep_rank, dp, ep, data_before_ep))
    except RuntimeError as exc:
        raise AutoEPMetadataError(str(exc), fix="the checkpoint's DP size must be a multiple of its autoep_size") \
            from None


def local_experts(entry: Dict[str, Any], ep_rank: int) -> List[int]:
    """Global expert ids of EP rank ``ep_rank``'s local rows, in packed order."""
    placement = entry.get(C.AUTOEP_EXPERT_PLACEMENT)
    if placement:
        for r in placement[C.AUTOEP_PLACEMENT_RANKS]:
            if r[C.AUTOEP_PLACEMENT_RANK] == ep_rank:
                return list(r[C.AUTOEP_PLACEMENT_EXPERTS])
        return []
    n = entry[C.AUTOEP_NUM_LOCAL_EXPERTS]
    return list(range(ep_rank * n, (ep_rank + 1) * n))


def place_rows(offset: int, numel: int, row: int, experts: Sequence[int], taken: set) -> List[Tuple[int, int, int]]:
    """Split the EP-local run ``[offset, offset + numel)`` at expert rows: ``(local_offset, numel, global_offset)``
    for each row part whose global expert is not yet ``taken`` (a replicated expert is read once)."""
    out = []
    pos, end = offset, offset + numel
    while pos < end:
        j = pos // row
        stop = min(end, (j + 1) * row)
        g = experts[j]
        if g not in taken:
            out.append((pos, stop - pos, g * row + pos - j * row))
        pos = stop
    return out


def place_fragment(frag, row: int, experts: Sequence[int], taken: set) -> list:
    """``frag`` (a run of an EP rank's local tensor, ``frag.offset`` local) as fragments at the global rows
    of its experts (:func:`place_rows`)."""
    return [replace(frag, start=frag.start + local - frag.offset, numel=numel, offset=glob)
            for local, numel, glob in place_rows(frag.offset, frag.numel, row, experts, taken)]


def all_layers(files, metas) -> List[Dict[str, Any]]:
    """Every AutoEP layer entry of every model file of a checkpoint, in file order."""
    return [e for s in files.model_sources() for e in (metas[s.index].autoep_layers or [])]


class Zero3Experts:
    """Partition-native ZeRO-3 AutoEP (spec 3.3): each DP rank's model file names the EP rank whose
    experts its partitions hold; a partition is a run of that EP rank's local ``[E_local, ...]`` tensor."""

    def __init__(self, by_rank: Dict[int, Dict[str, Dict[str, Any]]]):
        self.by_rank = by_rank  # dp rank -> "<prefix>.wK" -> that file's layer entry
        self.names = set().union(*[set(v) for v in by_rank.values()]) if by_rank else set()
        self._taken: Dict[Tuple[str, int], int] = {}  # (name, global expert) -> EP rank read from

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __bool__(self) -> bool:
        return bool(self.names)

    def num_experts(self, name: str) -> int:
        return next(v[name] for v in self.by_rank.values() if name in v)[C.AUTOEP_NUM_EXPERTS]

    def place(self, name: str, dp_rank: int, local_shape: Tuple[int, ...], frag):
        """(full shape, fragments at global offsets) for the partition ``frag`` of dp rank ``dp_rank``."""
        from ..torchsave.format import shape_numel

        entry = self.by_rank[dp_rank][name]
        ep_rank = entry["ep_rank"]
        row = shape_numel(local_shape[1:])
        experts = local_experts(entry, ep_rank)
        taken = {g for (n, g), r in self._taken.items() if n == name and r != ep_rank}
        out = place_fragment(frag, row, experts, taken)
        for g in experts:
            self._taken.setdefault((name, g), ep_rank)
        return (entry[C.AUTOEP_NUM_EXPERTS],) + tuple(local_shape[1:]), out


def zero3_experts(layers_by_rank: Dict[int, Any], paths: Dict[int, str], tp: int) -> Zero3Experts:
    """The expert weights of a partition-native ZeRO-3 AutoEP checkpoint, per DP rank, validated with
    DeepSpeed's own checks; empty when the checkpoint has none."""
    if not any(layers_by_rank.values()):
        return Zero3Experts({})  # without importing DeepSpeed's converter (and torch): 1.4-2 s of a ZeRO-3 run
    from deepspeed.checkpoint.ds_to_universal import _autoep_expert_param_info

    by_rank = {}
    for d, layers in layers_by_rank.items():
        if not layers:
            continue
        try:
            by_rank[d] = _autoep_expert_param_info(layers)
        except (RuntimeError, ValueError) as exc:
            raise AutoEPMetadataError(str(exc), paths[d], "the AutoEP metadata is damaged; copy the model files again") \
                from None
    experts = Zero3Experts({d: v for d, v in by_rank.items() if v})
    if experts and tp > 1:
        raise UnsupportedCheckpointError(f"is a ZeRO-3 AutoEP checkpoint at TP={tp}: AutoEP + AutoTP conversion is "
                                         "out of scope", paths[0], "load it with the topology it was saved at")
    return experts
