"""The small descriptions shared by the plan, the readers, the exchange and the writers.

A *source* is one native shard (a file today; a live optimizer partition for in-job conversion).
A *fragment* is a contiguous run of one parameter's flattened elements inside one flat
partition of a source. A *parameter* is the list of its fragments in the order that rebuilds it
(tensor-parallel rank, then data-parallel rank) plus what the writer needs to shape the result.
A *piece* places a strided block of one tensor at a strided position of another (DeepSpeed's affine
map vocabulary): a :class:`ShardMap` lists the pieces of a TP / EP rank's shard inside the full
tensor. The loader reads a target rank's shard through them, and the converter merges TP slices
through the same maps run backwards (:meth:`uckpt.dsformat.tp_rules.MergeRule.slice_maps`).
Everything here is plain data: picklable, comparable, free of tensors and of I/O.
"""
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator, List, Sequence, Tuple

from .torchsave.format import row_major_strides, shape_numel, strided_runs

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
    nbytes: int = 0  # of module[name] as saved: what writing it reads
    numel: int = 0


@dataclass(frozen=True)
class Piece:
    """Elements at ``as_strided(full, shape, src_strides, src_offset)`` go to
    ``as_strided(shard, shape, dst_strides, dst_offset)``, multiplied by ``scale ** power``."""

    shape: Tuple[int, ...]
    src_offset: int
    src_strides: Tuple[int, ...]
    dst_offset: int
    dst_strides: Tuple[int, ...]
    scale: float = 1.0

    def runs(self) -> Iterator[Tuple[int, int, int]]:
        """(source offset, destination offset, elements) of the runs that are contiguous on both sides."""
        return strided_runs(self.shape, [(self.src_offset, self.src_strides), (self.dst_offset, self.dst_strides)])


@dataclass
class ShardMap:
    """One rank's shard of a Universal tensor: its shape and the pieces that fill it (rest is zero)."""

    shard_shape: Tuple[int, ...]
    pieces: List[Piece]
    scale_power: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shard_shape)


def chunk_span(size: int, parts: int, index: int) -> Tuple[int, int]:
    """``torch.chunk(size, parts)[index]`` as (start, width) (torch sizes every chunk ceil(size/parts))."""
    c = -(-size // parts) if size else 0
    start = min(index * c, size)
    return start, max(0, min(c, size - start))


def narrows_cat(view_shape: Sequence[int], dim: int, spans: Sequence[Tuple[int, int]], base: int) -> ShardMap:
    """``cat([view.narrow(dim, s, w) for s, w in spans], dim)`` of a contiguous view at element ``base``."""
    view_shape = tuple(int(d) for d in view_shape)
    src_strides = row_major_strides(view_shape)
    shard_shape = list(view_shape)
    shard_shape[dim] = sum(w for _, w in spans)
    shard_shape = tuple(shard_shape)
    dst_strides = row_major_strides(shard_shape)
    pieces, at = [], 0
    for start, width in spans:
        shape = list(view_shape)
        shape[dim] = width
        if width and math.prod(shape):
            pieces.append(Piece(tuple(shape), base + start * src_strides[dim], src_strides, at * dst_strides[dim],
                                dst_strides))
        at += width
    return ShardMap(shard_shape, pieces)


def whole(shape: Tuple[int, ...], base: int) -> ShardMap:
    """The whole (contiguous) tensor at element ``base``, a scalar included."""
    if not shape:
        return ShardMap((), [Piece((), base, (), 0, ())])
    return narrows_cat(shape, 0, [(0, shape[0])], base)
