"""Which native checkpoint files a folder holds, from file names and sizes alone (no tensor reads).

Naming rules: DeepSpeed ``runtime/engine.py`` (``_get_ckpt_name``, ``_get_zero_ckpt_name``...);
see ``shared/docs/universal-checkpoint-format.md`` section 1.1.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import constants as C
from ..errors import CheckpointError
from ..regions import Kind, Source, SourceKind

ZERO12_MODEL_RE = re.compile(rf"^{C.MODEL_FILE_PREFIX}(\d+){C.MODEL_FILE_SUFFIX}$")
ZERO3_MODEL_RE = re.compile(rf"^{C.ZERO_FILE_PREFIX}(\d+)_{C.MODEL_FILE_PREFIX}(\d+){C.MODEL_FILE_SUFFIX}$")
OPTIM_RE = re.compile(rf"^(bf16_|fp16_)?{C.ZERO_FILE_PREFIX}(\d+)_{C.MODEL_FILE_PREFIX}(\d+){C.OPTIM_FILE_SUFFIX}$")
EXPERT_RE = re.compile(rf"^layer_(\d+)_expert_(\d+)_{C.MODEL_FILE_PREFIX}(\d+){C.MODEL_FILE_SUFFIX}$")
PIPE_LAYER_RE = re.compile(r"^layer_(\d+)(-model_(\d+))?-model_states\.pt$")
EXPERT_OPTIM_RE = re.compile(rf"^expp_rank_(\d+)_{C.MODEL_FILE_PREFIX}(\d+){C.OPTIM_FILE_SUFFIX}$")


class Family(Kind):
    """How a checkpoint lays out its optimizer partitions: ZeRO-1/2 (flat groups with recorded
    ``param_slice_mappings``, one model file per model-parallel rank) or ZeRO-3 (per-parameter
    partitions in ``fp32_flat_groups``, one model file per DP and model-parallel rank)."""

    ZERO12 = "zero12"
    ZERO3 = "zero3"


@dataclass
class CheckpointFiles:
    """The shard files of one checkpoint tag folder, classified by name.

    ``family`` is ZERO3 when the model files are per-DP-rank (``zero_pp_rank_D_mp_rank_TT``),
    else ZERO12. ``sources`` holds model files first (by mp rank, then dp), then optimizer files
    ordered by (dp, mp) as DeepSpeed's ``sort_zero_files`` does. A source's ``tp`` field holds the
    file's model-parallel rank ``TT`` here; the index splits it into (pp, tp) once the degrees are
    known. Pipeline layer files are listed but never read: the weights come from the optimizer.
    """

    folder: str
    family: Family
    sources: List[Source]
    optim_prefix: str
    expert_files: List[str] = field(default_factory=list)
    layer_files: List[str] = field(default_factory=list)
    # sizes of the expert and layer files where the caller knew them (a simulated layout); the others
    # are asked of the file system only when wanted (a conversion never does: it reads them whole)
    known_nbytes: Dict[str, int] = field(default_factory=dict)

    def unread_share(self, rank: int, world: int) -> List[str]:
        """The files no conversion reads for their content (pipeline layer and per-expert files) whose
        bytes rank ``rank`` of ``world`` checks against their CRC-32: every ``world``-th, by name."""
        return sorted(self.layer_files + self.expert_files)[rank::world]

    def unread_nbytes(self, path: str) -> int:
        """Size of one of those files (:meth:`unread_share`)."""
        known = self.known_nbytes.get(path)
        return os.path.getsize(path) if known is None else known

    def model_sources(self) -> List[Source]:
        return [s for s in self.sources if s.kind is SourceKind.MODEL]

    def optim_sources(self) -> List[Source]:
        return [s for s in self.sources if s.kind is SourceKind.OPTIM]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)


def _grid(coords: Dict[Tuple[int, int], str], what: str, folder: str) -> Tuple[int, int]:
    """(dp_degree, mp_degree) of a complete (dp, mp) grid of files, else a CheckpointError."""
    dps = {dp for dp, _ in coords}
    mps = {mp for _, mp in coords}
    n_dp, n_mp = max(dps) + 1, max(mps) + 1
    missing = [(dp, mp) for dp in range(n_dp) for mp in range(n_mp) if (dp, mp) not in coords]
    if missing:
        dp, mp = missing[0]
        raise CheckpointError(
            f"{what} file for dp rank {dp}, mp rank {mp:02d} is missing ({len(missing)} of {n_dp * n_mp} missing)",
            folder, "copy the complete tag folder from the training job's save directory")
    return n_dp, n_mp


def discover(folder: str) -> CheckpointFiles:
    """Classify the files of ``folder``; raise a CheckpointError naming the problem otherwise."""
    if not os.path.exists(folder):
        raise CheckpointError("does not exist", folder, "pass the checkpoint tag folder, e.g. ckpts/global_step1000")
    if not os.path.isdir(folder):
        raise CheckpointError("is not a folder", folder, "pass the checkpoint tag folder, e.g. ckpts/global_step1000")
    return classify(folder, {name: None for name in os.listdir(folder)})


def classify(folder: str, sizes: Dict[str, Optional[int]]) -> CheckpointFiles:
    """Classify the files ``sizes`` names (``None``: the size of ``<folder>/<name>`` on disk) as the tag
    folder ``folder`` holding them: a saved folder, or the files a live job would save (in-job)."""
    names = sorted(sizes)

    def size(path: str) -> int:
        known = sizes[os.path.basename(path)]
        return os.path.getsize(path) if known is None else known

    zero12_models, zero3_models, optims = {}, {}, {}
    prefixes = set()
    experts, layers = [], []
    for name in names:
        path = os.path.join(folder, name)
        if m := ZERO12_MODEL_RE.match(name):
            zero12_models[int(m.group(1))] = path
        elif m := ZERO3_MODEL_RE.match(name):
            zero3_models[(int(m.group(1)), int(m.group(2)))] = path
        elif m := OPTIM_RE.match(name):
            prefixes.add(m.group(1) or "")
            optims[(int(m.group(2)), int(m.group(3)))] = path
        elif EXPERT_RE.match(name) or EXPERT_OPTIM_RE.match(name):
            experts.append(path)
        elif PIPE_LAYER_RE.match(name):
            layers.append(path)

    if not zero12_models and not zero3_models and not optims:
        latest = os.path.join(folder, C.LATEST_FILE)
        if C.LATEST_FILE in sizes and os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
            raise CheckpointError("is a save directory, not a checkpoint tag folder", folder,
                                  f"pass the tag folder named by its 'latest' file: {os.path.join(folder, tag)}")
        raise CheckpointError("is not a DeepSpeed checkpoint folder (no *_model_states.pt or *_optim_states.pt files)",
                              folder, "pass the tag folder that engine.save_checkpoint wrote, e.g. ckpts/global_step1000")
    if zero12_models and zero3_models:
        raise CheckpointError("mixes ZeRO-1/2 model files (mp_rank_*) with ZeRO-3 model files (zero_pp_rank_*_model_states)",
                              folder, "the folder holds files of two different saves; keep the files of one run only")
    if not optims:
        raise CheckpointError("has model states but no optimizer shards (*_optim_states.pt): a ZeRO-0 or "
                              "weights-only save cannot become a Universal checkpoint", folder,
                              "save with ZeRO stage 1, 2 or 3 so the fp32 master weights and Adam moments are stored")
    if len(prefixes) > 1:
        raise CheckpointError("mixes optimizer files with different precision prefixes "
                              f"({', '.join(repr(p or 'none') for p in sorted(prefixes))})", folder,
                              "the folder holds files of two different saves; keep the files of one run only")
    n_dp, n_mp = _grid(optims, "optimizer", folder)
    sources: List[Source] = []
    if zero3_models:
        family = Family.ZERO3
        m_dp, m_mp = _grid(zero3_models, "model-state", folder)
        if (m_dp, m_mp) != (n_dp, n_mp):
            raise CheckpointError(f"has ZeRO-3 model files for a {m_dp}x{m_mp} (dp x mp) grid but optimizer files for "
                                  f"{n_dp}x{n_mp}", folder, "copy the complete tag folder from the training job")
        for (dp, mp) in sorted(zero3_models, key=lambda k: (k[1], k[0])):
            path = zero3_models[(dp, mp)]
            sources.append(Source(len(sources), path, SourceKind.MODEL, tp=mp, dp=dp, nbytes=size(path)))
    else:
        family = Family.ZERO12
        mps = sorted(zero12_models)
        if mps != list(range(len(mps))) or len(mps) != n_mp:
            raise CheckpointError(f"has model files for mp ranks {mps} but optimizer files for {n_mp} mp ranks",
                                  folder, "copy the complete tag folder from the training job")
        for mp in mps:
            path = zero12_models[mp]
            sources.append(Source(len(sources), path, SourceKind.MODEL, tp=mp, nbytes=size(path)))
    for (dp, mp) in sorted(optims):
        path = optims[(dp, mp)]
        sources.append(Source(len(sources), path, SourceKind.OPTIM, tp=mp, dp=dp, nbytes=size(path)))
    for s in sources:
        if s.nbytes == 0:
            raise CheckpointError("is empty (0 bytes)", s.path, "the save was interrupted; use an earlier checkpoint tag")
    return CheckpointFiles(folder, family, sources, prefixes.pop(), experts, layers,
                           {p: n for p in experts + layers if (n := sizes[os.path.basename(p)]) is not None})
