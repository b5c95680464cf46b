"""Load-side slicing: uckpt's piece maps, read by byte ranges, give exactly the fragment DeepSpeed's own
``load_hp_checkpoint_state`` computes from the whole tensor, for every rule of spec section 4."""
import os
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from deepspeed.checkpoint.affine import contiguous_split_map, sub_param_map
from deepspeed.checkpoint.universal_checkpoint import SubparamShape, load_hp_checkpoint_state

from uckpt.dsformat import constants as C
from uckpt.torchsave import reader as ranged
from uckpt.torchsave.stats import IO
from uckpt.errors import CheckpointError, InvalidCheckpointError
from uckpt.dsformat.zero3 import zero3_span
from uckpt.load.slicing import Target, read_flat, shard_map

Address = namedtuple("Address", "start numel")


def deepspeed_fragment(tmp_path, full, info, local_shape, tp, ep, start, numel, autotp=None):
    """DeepSpeed 0.19.8's loader on a stand-in lp parameter whose ZeRO fragment is [start, start+numel)."""
    folder = tmp_path / "ds"
    folder.mkdir(exist_ok=True)
    torch.save(dict(info, param=full), folder / "fp32.pt")
    lp = torch.empty(local_shape)
    dst = torch.empty(numel)
    lp._hp_mapping = SimpleNamespace(optim_fragment={}, lp_fragment_address=Address(start, numel),
                                     get_hp_fragment=lambda: dst)
    if autotp is not None:
        setattr(lp, C.DS_AUTOTP_UC_META, autotp)
    load_hp_checkpoint_state(lp, str(folder), tp[0], tp[1], ep_rank=ep[0], ep_size=ep[1])
    return dst


def uckpt_fragment(tmp_path, full, info, local_shape, tp, ep, start, numel, autotp=None):
    path = tmp_path / "ours.pt"
    torch.save(dict(info, param=full), path)
    lazy = ranged.open_lazy(str(path))
    ft = lazy.pop(C.PARAM)
    target = Target(tuple(local_shape), tp[0], tp[1], ep[0], ep[1], autotp_meta=autotp)
    return read_flat(ft, shard_map(ft.shape, lazy, target, C.FP32_WEIGHT_KEY), start, numel)


def _local_numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


CASES = {
    "rows": ((8, 6), {C.CAT_DIM: 0}, (4, 6), 2, (1, 1), None),
    "columns": ((8, 6), {C.CAT_DIM: 1}, (8, 3), 2, (1, 1), None),
    "columns-tp3": ((4, 6), {C.CAT_DIM: 1}, (4, 2), 3, (1, 1), None),
    "replica-shortcut": ((6,), {}, (6,), 2, (1, 1), None),
    "vocab-repad": ((10, 4), {C.VOCAB_TENSOR: True}, (6, 4), 2, (1, 1), None),
    "two-sub-params": ((8, 4), {C.CAT_DIM: 0, C.PARAM_N_SUB_PARAMS: 2}, (4, 4), 2, (1, 1), None),
    "sub-param-shape": ((8, 3), {C.SUB_PARAM_SHAPE: SubparamShape([], ((4, 2, 2), 3), 0)}, (4, 3), 2, (1, 1), None),
    "experts": ((4, 3, 2), {C.EP_IS_EXPERT_PARAM: True, C.EP_NUM_EXPERTS: 4}, (2, 3, 2), 1, (1, 2), None),
    "autotp-uneven": ((5, 4), {}, (2, 4), 2, (1, 1),
                      {"partition_dim": 0, "logical_shape": [5, 4], "partition_sizes": [3, 2]}),
    "autotp-sub-widths": ((8, 2), {}, (4, 2), 2, (1, 1),
                          {"partition_dim": 0, "logical_shape": [8, 2], "sub_param_sizes": [4, 2, 2],
                           "sub_param_shard_widths": [[2, 2], [1, 1], [1, 1]], C.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.4}),
    "autotp-even": ((6, 4), {}, (6, 2), 2, (1, 1), {"partition_dim": 1, "logical_shape": [6, 4]}),
    "autotp-replicated": ((6,), {}, (6,), 2, (1, 1), {"replicated": True, "partition_dim": None}),
    "autotp-affine-columns": ((6, 4), {}, (6, 2), 2, (1, 1),
                              {"partition_dim": 1, "logical_shape": [6, 4],
                               "conversion": {"affine_map": contiguous_split_map((6, 4), [2, 2], 1).to_dict()}}),
    "autotp-affine-sub": ((8, 2), {}, (4, 2), 2, (1, 1),
                          {"partition_dim": 0, "logical_shape": [8, 2],
                           "conversion": {"affine_map": sub_param_map((8, 2), [4, 2, 2], [[2, 2], [1, 1], [1, 1]],
                                                                      0).to_dict()}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fragments_equal_deepspeed(tmp_path, case):
    shape, info, local, tp_size, ep, autotp = CASES[case]
    full = torch.randn(shape)
    n = _local_numel(local)
    for tp_rank in range(tp_size):
        for start, numel in ((0, n), (1, n - 3), (n // 2, n - n // 2), (n - 1, 1)):
            theirs = deepspeed_fragment(tmp_path, full, info, local, (tp_rank, tp_size), ep, start, numel, autotp)
            ours = uckpt_fragment(tmp_path, full, info, local, (tp_rank, tp_size), ep, start, numel, autotp)
            assert torch.equal(ours, theirs), (case, tp_rank, start, numel)


def test_reads_only_the_fragment(tmp_path):
    """A quarter of a row-split tensor's TP slice costs about that many bytes plus the pickle."""
    full = torch.randn(1024, 256)
    path = tmp_path / "fp32.pt"
    torch.save({C.PARAM: full, C.CAT_DIM: 0}, path)
    before = IO.snapshot()
    lazy = ranged.open_lazy(str(path))
    ft = lazy.pop(C.PARAM)
    smap = shard_map(ft.shape, lazy, Target((512, 256), 1, 2), C.FP32_WEIGHT_KEY)
    got = read_flat(ft, smap, 128 * 256, 128 * 256)
    assert torch.equal(got, full[512 + 128:512 + 256].flatten())
    read = IO.since(before)["read_bytes"]
    assert 128 * 256 * 4 <= read < 128 * 256 * 4 + 4096, read
    # columns: one run per row, still only the kept bytes
    before = IO.snapshot()
    smap = shard_map(ft.shape, {C.CAT_DIM: 1}, Target((1024, 128), 1, 2), C.FP32_WEIGHT_KEY)
    got = read_flat(ft, smap, 0, 10 * 128)
    assert torch.equal(got, full[:10, 128:].flatten())
    assert IO.since(before)["read_bytes"] == 10 * 128 * 4


@pytest.mark.parametrize("tp_rank,cat_dim,start,numel", [(0, 0, 0, 512 * 256), (1, 0, 128 * 256, 128 * 256),
                                                      (1, 0, 1000, 300), (1, 1, 0, 10 * 128), (0, 1, 77, 1000)])
def test_reads_into_a_view_of_a_larger_buffer(tmp_path, tp_rank, cat_dim, start, numel):
    """The loader reads fragments straight into a slice of the optimizer's flat buffer (a view at an
    offset of its storage): the same values as a fresh read, nothing outside the slice touched."""
    full = torch.randn(1024, 256)
    path = tmp_path / "fp32.pt"
    torch.save({C.PARAM: full, C.CAT_DIM: cat_dim}, path)
    lazy = ranged.open_lazy(str(path))
    ft = lazy.pop(C.PARAM)
    local = (512, 256) if cat_dim == 0 else (1024, 128)
    smap = shard_map(ft.shape, lazy, Target(local, tp_rank, 2), C.FP32_WEIGHT_KEY)
    want = read_flat(ft, smap, start, numel)
    flat = torch.full((numel + 1000,), -7.0)
    out = flat.narrow(0, 600, numel)
    assert read_flat(ft, smap, start, numel, out=out) is out
    assert torch.equal(out, want)
    assert torch.all(flat[:600] == -7.0) and torch.all(flat[600 + numel:] == -7.0)


def test_zero3_partition_matches_deepspeed_padding():
    flat = torch.arange(10.0)
    for world in (1, 3, 4):
        q = -(-10 // world)
        padded = torch.cat([flat, torch.zeros(q * world - 10)])
        for rank in range(world):
            start, length, size = zero3_span(10, rank, world)
            got = torch.cat([flat[start:start + length], torch.zeros(size - length)])
            assert torch.equal(got, padded[rank * q:(rank + 1) * q])


def test_expert_count_must_divide(tmp_path):
    info = {C.EP_IS_EXPERT_PARAM: True, C.EP_NUM_EXPERTS: 8}
    for ep in (1, 2, 4, 8):
        shard_map((8, 3), info, Target((8 // ep, 3), ep_rank=0, ep_size=ep), C.FP32_WEIGHT_KEY)
    with pytest.raises(CheckpointError, match="8 experts.*expert-parallel size 3"):
        shard_map((8, 3), info, Target((2, 3), ep_rank=0, ep_size=3), C.FP32_WEIGHT_KEY)


def test_expert_count_mismatch_names_both_local_counts():
    """DeepSpeed's wording, and a ValueError as DeepSpeed's (16 target experts over EP 2 = 8 local)."""
    info = {C.EP_IS_EXPERT_PARAM: True, C.EP_NUM_EXPERTS: 8}
    with pytest.raises(ValueError, match="target_local_experts=8, checkpoint_local_experts=4"):
        shard_map((8, 3), info, Target((8, 3), ep_rank=0, ep_size=2, name="experts.w1"), C.FP32_WEIGHT_KEY)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(InvalidCheckpointError, match=r"blocks.0.weight.*\[8, 6\].*\[5, 6\]") as exc:
        shard_map((8, 6), {}, Target((5, 6), 0, 2, name="blocks.0.weight"), C.FP32_WEIGHT_KEY)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, CheckpointError)


def test_fallback_for_files_that_are_not_zip(tmp_path):
    path = tmp_path / "legacy.pt"
    full = torch.randn(4, 4)
    torch.save({C.PARAM: full}, path, _use_new_zipfile_serialization=False)
    lazy = ranged.open_lazy(str(path))
    smap = shard_map((4, 4), {}, Target((2, 4), 1, 2), C.FP32_WEIGHT_KEY)
    assert torch.equal(read_flat(lazy[C.PARAM], smap, 0, 8), full[2:].flatten())
    assert os.path.getsize(path) > 0
