"""Tensor-parallel merge rules of ``universal_checkpoint_info`` (spec section 2.4), resolved per
parameter once (pure, identical on every rank) and applied by the owner to the per-TP slices.

Order of precedence, as in DeepSpeed 0.19.8's ``merge_tp_slices``: affine map; TP-replicated
(slices must be equal); averaged; the legacy 2-sub-parameter layout; sub-parameters (fused QKV /
gate_up, with per-rank shard widths from UC version 0.4 or even legacy widths); otherwise
concatenation on dim 1 (row-parallel) or dim 0. Vocabulary parameters are then cut to
``original_vocab_size`` rows and tagged. :mod:`uckpt.tp_merge` applies the rules to tensors
(DeepSpeed's affine-map class does the affine rebuild); resolving them needs neither torch nor
DeepSpeed's runtime, which are imported only for checkpoints that use sub-parameters or affine maps.

DIFFERENCE: DeepSpeed applies every pattern with ``re.match``, where ``.`` matches any
character, so the plain-name pattern ``layers.1.`` also captures ``layers.10.``. uckpt matches a
pattern that is exactly a parameter's name to that parameter only, and a pattern written as a
plain name (letters, digits, ``_``, ``-`` and ``.`` only) as a literal prefix. Patterns using
regex syntax (AutoTP writes ``^...$``) behave exactly as in DeepSpeed.
"""
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from . import constants as C
from ..errors import CheckpointError
from ..torchsave.format import shape_numel
from ..regions import Kind, ShardMap, narrows_cat, whole


_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")


class MergeKind(Kind):
    """How TP slices become one tensor, in DeepSpeed's order of precedence."""

    AFFINE = "affine"  # DeepSpeed's ParamAffineMap rebuilds it (pieces, scales)
    REPLICATED = "replicated"  # every rank holds the whole tensor; slices must be equal
    AVERAGE = "average"  # the mean of the slices
    TWO_SUB_PARAMS = "two_sub_params"  # legacy fused 2-sub-parameter layout, concatenated per half on dim 0
    SUB_PARAMS = "sub_params"  # fused sub-parameters (QKV, gate_up) with per-rank shard widths
    CAT = "cat"  # concatenated on cat_dim (0: column-parallel, 1: row-parallel)


@dataclass(frozen=True)
class MergeRule:
    kind: MergeKind
    cat_dim: int = 0
    affine: Optional[Dict[str, Any]] = None  # serialized ParamAffineMap
    sub_shape: Optional[Dict[str, Any]] = None  # SubparamShape fields, normalised
    sub_sizes: Optional[Tuple[int, ...]] = None
    shard_widths: Optional[List[List[int]]] = None
    vocab_rows: Optional[int] = None  # original_vocab_size when a vocabulary pattern matched
    experts: Optional[int] = None  # AutoEP routed expert weight: the number of experts (dim 0)

    def slice_maps(self, name: str, tp_shapes: Sequence[Tuple[int, ...]]) \
            -> Optional[Tuple[Tuple[int, ...], List[ShardMap]]]:
        """The merged tensor's shape (before a vocabulary cut) and where each TP rank's slice sits in
        it, as the load side's shard maps: merging runs them backwards, one copy per run, no arithmetic.

        ``None`` where the merge changes values or checks them (affine maps, replicated, averaged
        parameters), and for shapes DeepSpeed's own merge refuses: those go through
        :func:`uckpt.conversion.tp_merge.merge_slices`, which raises DeepSpeed's error."""
        shapes = [tuple(int(d) for d in s) for s in tp_shapes]
        if len(shapes) == 1 and self.kind in (MergeKind.CAT, MergeKind.REPLICATED, MergeKind.TWO_SUB_PARAMS):
            return shapes[0], [whole(shapes[0], 0)]  # DeepSpeed keeps a single slice as it is
        if not shapes[0]:
            return None
        if self.kind is MergeKind.CAT:
            d = self.cat_dim
            if d >= len(shapes[0]) or any(len(s) != len(shapes[0]) or s[:d] + s[d + 1:] != shapes[0][:d] + shapes[0][d + 1:]
                                          for s in shapes):
                return None
            full = list(shapes[0])
            full[d] = sum(s[d] for s in shapes)
            starts = [sum(s[d] for s in shapes[:t]) for t in range(len(shapes))]
            return tuple(full), [narrows_cat(full, d, [(starts[t], s[d])], 0) for t, s in enumerate(shapes)]
        if self.kind is MergeKind.TWO_SUB_PARAMS:  # torch.chunk(slice, 2) halves, all first halves first
            if any(s[0] < 2 or s[1:] != shapes[0][1:] for s in shapes):
                return None
            first = [-(-s[0] // 2) for s in shapes]
            full = (sum(s[0] for s in shapes),) + shapes[0][1:]
            h0 = sum(first)
            return full, [narrows_cat(full, 0, [(sum(first[:t]), first[t]),
                                          (h0 + sum(s[0] - f for s, f in zip(shapes[:t], first[:t])),
                                           shapes[t][0] - first[t])], 0) for t in range(len(shapes))]
        if self.kind is MergeKind.SUB_PARAMS:
            pd = self.sub_shape["partition_dim"]
            logical = [sum(d) if isinstance(d, tuple) else d for d in self.sub_shape["shape"]]
            logical[pd] = sum(self.sub_sizes)
            numel = sum(shape_numel(s) for s in shapes)
            try:
                logical = resolve_shape(logical, numel, name)
            except CheckpointError:
                return None
            maps, offset = [[] for _ in shapes], 0
            for size, widths in zip(self.sub_sizes, self.shard_widths):
                for t in range(len(shapes)):
                    maps[t].append((offset + sum(widths[:t]), widths[t]))
                offset += size
            out = [narrows_cat(logical, pd, spans, 0) for spans in maps]
            if any(m.numel != shape_numel(s) for m, s in zip(out, shapes)):
                return None
            return tuple(logical), out
        return None


def resolve_shape(shape: List[int], numel: int, name: str) -> List[int]:
    holes = [i for i, d in enumerate(shape) if d is not None and d < 0]
    if not holes:
        return shape
    known = 1
    for i, d in enumerate(shape):
        if i not in holes:
            known *= d
    if len(holes) > 1 or known <= 0 or numel % known:
        raise CheckpointError(f"sub-parameter shape {shape} of {name!r} cannot hold {numel} elements")
    out = list(shape)
    out[holes[0]] = numel // known
    return out


@dataclass
class RuleBook:
    """The checkpoint's patterns, with the bookkeeping for DeepSpeed's strict "unused pattern" check."""

    uc: Dict[str, Any]
    tp_degree: int
    names: Set[str]
    used: Set[str] = field(default_factory=set)

    def __post_init__(self):
        g = self.uc.get
        self.replicated = list(g(C.TP_REPLICATED_PARAMETER_PATTERNS, []) or [])
        self.average = list(g(C.PARAMETER_TO_AVERAGE_PATTERNS, []) or [])
        self.row = list(g(C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, []) or [])
        self.vocab = list(g(C.VOCABULARY_PARAMETER_PATTERNS, []) or [])
        self.two_sub = list(g(C.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0, []) or [])
        subs = g(C.PARAMETER_WITH_SUB_PARAMS, []) or []
        if subs:
            from deepspeed.checkpoint import SubparamShape
            self.sub_params = [SubparamShape(**s) for s in subs]
        else:
            self.sub_params = []
        self.widths = dict(g(C.SUB_PARAM_SHARD_WIDTHS, {}) or {})
        affine = g(C.AFFINE_MAP, {}) or {}
        if affine:
            from deepspeed.checkpoint.affine import AFFINE_MAP_FORMAT_VERSION
            version = affine.get("version", AFFINE_MAP_FORMAT_VERSION)
        if affine and version > AFFINE_MAP_FORMAT_VERSION:
            raise CheckpointError(f"records affine map format version {version}; this DeepSpeed reads up to "
                                  f"{AFFINE_MAP_FORMAT_VERSION}", fix="convert with a newer DeepSpeed")
        self.affine = dict(affine.get("params", {}) or {})
        self.version = g(C.UNIVERSAL_CHECKPOINT_VERSION_KEY, 0.0)

    def all_patterns(self) -> Set[str]:
        pats = set(self.replicated + self.average + self.row + self.vocab + self.two_sub)
        for s in self.sub_params:
            pats.update(s.patterns)
        return pats

    def _matches(self, pattern: str, name: str) -> bool:
        if pattern in self.names:  # an exact parameter name names that parameter only (see module doc)
            return pattern == name
        if _PLAIN.fullmatch(pattern):  # a plain name: its dots are dots
            return name.startswith(pattern)
        return re.match(pattern, name) is not None

    def _match(self, patterns: Sequence[str], name: str, mark: bool = True) -> Optional[str]:
        hits = [p for p in patterns if self._matches(p, name)]
        if len(hits) > 1:
            raise CheckpointError(f"parameter {name!r} matches more than one pattern of a category: {hits}",
                                  fix="fix the universal_checkpoint_info patterns of the training script")
        if hits and mark:
            self.used.add(hits[0])
        return hits[0] if hits else None

    def matches(self, patterns: Sequence[str], name: str) -> bool:
        """Whether ``name`` falls under one of ``patterns`` (a category of the book, e.g. ``book.row``),
        without counting the pattern as used: a question, not a resolution."""
        return self._match(patterns, name, mark=False) is not None

    def _match_sub(self, name: str) -> Tuple[Optional[Any], Optional[str]]:  # (SubparamShape, pattern)
        for shape in self.sub_params:
            for p in shape.patterns:
                if self._matches(p, name):
                    self.used.add(p)
                    return shape, p
        return None, None

    def resolve(self, name: str, tp_shapes: Sequence[Optional[Tuple[int, ...]]]) -> MergeRule:
        affine = self._match(list(self.affine), name, mark=False)
        vocab_rows = None
        if affine is not None:
            # the category patterns it supersedes count as used (DeepSpeed: consume_superseded_patterns)
            for cat in (self.replicated, self.average, self.row, self.vocab, self.two_sub):
                self._match(cat, name)
            self._match_sub(name)
            rule = MergeRule(MergeKind.AFFINE, affine=self.affine[affine])
        elif self._match(self.replicated, name):
            rule = MergeRule(MergeKind.REPLICATED)
        elif self._match(self.average, name):
            rule = MergeRule(MergeKind.AVERAGE)
        elif self._match(self.two_sub, name):
            rule = MergeRule(MergeKind.TWO_SUB_PARAMS, cat_dim=0)
        else:
            sub, pattern = self._match_sub(name)
            if sub is not None:
                rule = self._sub_rule(name, sub, pattern, tp_shapes)
            else:
                rule = MergeRule(MergeKind.CAT, cat_dim=1 if self._match(self.row, name) else 0)
        if self._match(self.vocab, name):
            if C.ORIGINAL_VOCAB_SIZE not in self.uc:
                raise CheckpointError(f"{name!r} is a vocabulary parameter but {C.ORIGINAL_VOCAB_SIZE} is missing",
                                      fix="the checkpoint's universal_checkpoint_info is incomplete")
            vocab_rows = int(self.uc[C.ORIGINAL_VOCAB_SIZE])
        return replace(rule, vocab_rows=vocab_rows)

    def _sub_rule(self, name, sub, pattern: str, tp_shapes) -> MergeRule:
        pd = sub.partition_dim
        spec = sub.shape[pd]
        T = self.tp_degree
        if self.version >= 0.4:
            if pattern not in self.widths:
                raise CheckpointError(f"universal checkpoint version {self.version} records no "
                                      f"{C.SUB_PARAM_SHARD_WIDTHS} for {name!r} (pattern {pattern})")
            sizes, widths, shape = tuple(spec), [list(w) for w in self.widths[pattern]], sub
        else:
            if isinstance(spec, tuple):
                sizes, shape = tuple(spec), sub
            else:
                total = sum(s[pd] for s in tp_shapes if s is not None)
                if spec <= 0 or total % spec:
                    raise CheckpointError(f"legacy sub-parameter count {spec} of {name!r} does not divide {total}")
                sizes = (total // spec,) * spec
                normalized = list(sub.shape)
                normalized[pd] = sizes
                shape = type(sub)(patterns=sub.patterns, shape=tuple(normalized), partition_dim=pd)
            uneven = [s for s in sizes if s % T]
            if uneven:
                raise CheckpointError(f"sub-parameter sizes {uneven} of {name!r} are not divisible by tp {T} and "
                                      f"version {self.version} records no shard widths")
            widths = [[s // T] * T for s in sizes]
        if len(widths) != len(sizes) or any(len(w) != T or sum(w) != s for w, s in zip(widths, sizes)):
            raise CheckpointError(f"shard widths {widths} of {name!r} do not describe sub-parameter sizes {sizes} "
                                  f"over {T} TP ranks")
        return MergeRule(MergeKind.SUB_PARAMS, sub_shape={"patterns": list(shape.patterns), "shape": shape.shape,
                                                  "partition_dim": pd}, sub_sizes=sizes, shard_widths=widths)

    def unused(self) -> Set[str]:
        return self.all_patterns() - self.used
