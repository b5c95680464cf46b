"""TP merges that only move data run the load side's shard maps backwards: the payload built from
bytes, without torch arithmetic, equals what the torch merge (DeepSpeed's rules) gives, and the maps
are the ones the loader slices a merged tensor with."""
import pytest
import torch

from uckpt.conversion.payloads import state_payload
from uckpt.conversion.tp_merge import merge_slices
from uckpt.dsformat.tp_rules import MergeKind, MergeRule
from uckpt.load.slicing import Target, shard_map
from uckpt.regions import ParamSpec

SUB = {"patterns": ["x"], "shape": ((40, 24), 16), "partition_dim": 0}  # a fused [gate; up] of 40 + 24 rows

CASES = [
    ("column, even", MergeRule(MergeKind.CAT, 0), [(8, 6), (8, 6)]),
    ("column, uneven TP=3", MergeRule(MergeKind.CAT, 0), [(5, 4), (5, 4), (4, 4)]),
    ("row, TP=2", MergeRule(MergeKind.CAT, 1), [(6, 4), (6, 4)]),
    ("row, uneven TP=3", MergeRule(MergeKind.CAT, 1), [(6, 43), (6, 43), (6, 42)]),
    ("bias, TP=2", MergeRule(MergeKind.CAT, 0), [(7,), (7,)]),
    ("vocabulary rows cut", MergeRule(MergeKind.CAT, 0, vocab_rows=13), [(8, 6), (8, 6)]),
    ("two sub-parameters, TP=2", MergeRule(MergeKind.TWO_SUB_PARAMS, 0), [(6, 3), (6, 3)]),
    ("two sub-parameters, odd rows TP=3", MergeRule(MergeKind.TWO_SUB_PARAMS, 0), [(5, 2), (5, 2), (3, 2)]),
    ("sub-parameters, uneven widths TP=3",
     MergeRule(MergeKind.SUB_PARAMS, sub_shape=SUB, sub_sizes=(40, 24), shard_widths=[[14, 13, 13], [8, 8, 8]]),
     [(22, 16), (21, 16), (21, 16)]),
    ("experts, one slice", MergeRule(MergeKind.CAT, 0, experts=4), [(4, 3, 2)]),
    ("replicated, one slice", MergeRule(MergeKind.REPLICATED), [(3, 5)]),
]


def _flat(shapes):
    n = sum(torch.Size(s).numel() for s in shapes)
    return bytearray((torch.randn(n) * 100).numpy().tobytes())


def _same(a, b):
    assert list(a) == list(b)  # the same keys in the same order
    for key in a:
        if key == "param":
            got = a[key].to_torch() if hasattr(a[key], "to_torch") else a[key]
            assert got.shape == b[key].shape and torch.equal(got, b[key])
        elif key == "sub_param_shape":
            assert vars(a[key]) == vars(b[key])
        else:
            assert a[key] == b[key]


@pytest.mark.parametrize("label,rule,shapes", CASES, ids=[c[0] for c in CASES])
def test_byte_merge_equals_torch_merge(label, rule, shapes):
    spec = ParamSpec("x", shapes[0], shapes, [], rule=rule)
    flat = _flat(shapes)
    assert rule.slice_maps("x", shapes) is not None  # these rules need no torch
    from uckpt.conversion.payloads import tp_slices
    from uckpt.torchsave.format import as_fp32_tensor
    expected = merge_slices("x", rule, tp_slices(spec, as_fp32_tensor(bytearray(flat))), "fp32")
    _same(state_payload(spec, flat, "fp32"), expected)


def test_rules_that_change_values_go_through_torch():
    for rule in (MergeRule(MergeKind.AVERAGE), MergeRule(MergeKind.REPLICATED)):
        assert rule.slice_maps("x", [(4, 2), (4, 2)]) is None
    assert MergeRule(MergeKind.CAT, 1).slice_maps("x", [(4,), (4,)]) is None  # DeepSpeed's cat raises on it


@pytest.mark.parametrize("dim", [0, 1])
def test_merge_maps_are_the_loaders_shard_maps(dim):
    """An even split: what the loader gives TP rank t of the merged tensor is what the merge took from it."""
    shapes = [(6, 4) if dim == 0 else (6, 2)] * 2
    full, maps = MergeRule(MergeKind.CAT, dim).slice_maps("x", shapes)
    for t in range(2):
        assert shard_map(full, {"cat_dim": dim}, Target(tp_rank=t, tp_size=2), "fp32") == maps[t]
