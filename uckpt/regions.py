"""The small descriptions shared by the plan, the readers, the exchange and the writers.

A *source* is one native shard (a file today; a live optimizer partition for in-job conversion).
A *fragment* is a contiguous run of one parameter's flattened elements inside one flat
partition of a source. A *parameter* is the list of its fragments in the order that rebuilds it
(tensor-parallel rank, then data-parallel rank) plus what the writer needs to shape the result.
Everything here is plain data: picklable, comparable, free of tensors and of I/O.
"""
from dataclasses import dataclass
from enum import Enum
from typing import Any, List, Tuple

from .torchsave.format import shape_numel

Shape = Tuple[int, ...]


class Kind(str, Enum):
    """An enum of names that prints, formats and serialises (JSON reports) as its plain value."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class SourceKind(Kind):
    """What a source holds: module weights and metadata, or an optimizer partition."""

    MODEL = "model"
    OPTIM = "optim"


@dataclass(frozen=True)
class Source:
    """One native shard: where it is, which (pp, tp, dp) coordinates it holds, how big it is."""

    index: int
    path: str
    kind: SourceKind
    pp: int = 0
    tp: int = 0
    dp: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class Fragment:
    """Elements ``[start, start + numel)`` of flat group ``group`` of source ``source``.

    They are the elements ``[offset, offset + numel)`` of the flattened slice that TP rank
    ``tp`` holds of the parameter.
    """

    source: int
    group: int
    start: int
    numel: int
    tp: int
    dp: int
    offset: int


@dataclass(frozen=True)
class ParamSpec:
    """One Universal parameter: its fragments and how the owner writes it."""

    name: str
    shape: Shape  # TP rank 0's slice shape (the full shape at TP=1)
    tp_shapes: List[Shape]  # shape of each TP rank's slice (one entry at TP=1)
    fragments: List[Fragment]  # TP-major, then DP order
    step: Any = None  # optimizer step value written as step.pt (a tensor or an int)
    has_step: bool = False  # whether step.pt is written (ZeRO-3: never, as in DeepSpeed)
    flat_output: bool = False  # ZeRO-3 at TP=1: DeepSpeed writes a bare flat tensor, not a dict
    rule: Any = None  # tp_rules.MergeRule: how the owner merges the TP slices (None with flat_output)
    skip_states: Tuple[str, ...] = ()  # AutoEP experts whose shards lack these moments: not written

    @property
    def numel(self) -> int:
        return sum(f.numel for f in self.fragments)

    def flat_offset(self, frag: Fragment) -> int:
        """Where ``frag`` starts in the assembled parameter: TP slices concatenated in TP order."""
        return sum(shape_numel(s) for s in self.tp_shapes[:frag.tp]) + frag.offset


@dataclass(frozen=True)
class FallbackSpec:
    """A folder written only with ``fp32.pt`` from the model file's ``module[name]`` cast to fp32.

    DeepSpeed 0.19.8 writes these for module keys without optimizer fragments: frozen
    parameters, buffers, zero-size parameters.
    """

    name: str
    source: int  # model file holding module[name]
