"""Index rules on the metadata of real checkpoints (read, not re-written): fragments, steps
(tensor and int forms), fallbacks and tied aliases, and metadata errors."""
import copy

import pytest
import torch

from uckpt.errors import CheckpointError, UnsupportedCheckpointError
from uckpt.dsformat.index import build_index
from uckpt.dsformat.files import discover
from uckpt.dsformat.shards import load_shard, source_meta


def _metas(tag):
    files = discover(tag)
    return files, {s.index: source_meta(s, load_shard(s.path), files.family) for s in files.sources}


def test_zero2_index(store):
    files, metas = _metas(store.tag("z2-bf16-dp4"))
    index = build_index(files, metas, inject_missing_state=True)
    assert (index.zero_stage, index.dp_degree, index.injected_uc_info) == (2, 4, True)
    names = [p.name for p in index.params]
    assert names[:3] == ["embed.weight", "blocks.0.weight", "blocks.1.weight"]
    for p in index.params:  # fragments rebuild the parameter in DP order without gaps
        assert [f.offset for f in p.fragments] == [sum(g.numel for g in p.fragments[:i]) for i in range(len(p.fragments))]
        assert p.numel == torch.Size(p.shape).numel()
    assert {fb.name for fb in index.fallbacks} == {"empty", "gain", "frozen.weight", "frozen.bias"}
    assert index.aliases == {"head.weight": "embed.weight"}


def test_step_int_form_and_mismatch(store):
    files, metas = _metas(store.tag("z2-bf16-dp4"))
    as_int = copy.deepcopy(metas)
    for m in as_int.values():
        for g in getattr(m, "groups", []):
            g.step = int(g.step.item())  # DeepSpeed's FusedAdam / CPUAdam keep a python int step
    index = build_index(files, as_int, inject_missing_state=True)
    assert all(p.step == 3 and isinstance(p.step, int) for p in index.params)
    bad = copy.deepcopy(as_int)
    optim = [s for s in files.optim_sources() if s.dp == 1][0]
    bad[optim.index].groups[0].step = 4
    with pytest.raises(CheckpointError, match="optimizer step 4 .* differs"):
        build_index(files, bad, inject_missing_state=True)


def test_zero3_index_uneven(store):
    files, metas = _metas(store.tag("z3-fp32-dp3"))
    index = build_index(files, metas)
    assert (index.family, index.zero_stage, index.dp_degree) == ("zero3", 3, 3)
    emb = next(p for p in index.params if p.name == "embed.weight")
    q = -(-emb.numel // 3)
    assert [f.numel for f in emb.fragments] == [q, q, emb.numel - 2 * q]
    assert emb.flat_output and not emb.has_step


def test_autotp_unsupported_patterns_refused(store):
    files, metas = _metas(store.tag("z2-fp32-dp3"))
    model = files.model_sources()[0].index
    metas[model].uc_info = {"universal_checkpoint_version": 0.4,
                            "autotp_unsupported_parameter_patterns": {"^x$": "Yuan shared QK"}}
    with pytest.raises(UnsupportedCheckpointError, match="AutoTP universal checkpoint conversion is not supported "
                                                         "for \\^x\\$: Yuan shared QK"):
        build_index(files, metas)


def test_fragment_outside_partition_is_an_error(store):
    files, metas = _metas(store.tag("z2-fp32-dp3"))
    optim = files.optim_sources()[0].index
    g = metas[optim].groups[0]
    name, (start, numel) = next(iter(g.mappings.items()))
    g.mappings[name] = (g.fp32_numel - 1, numel)
    with pytest.raises(CheckpointError, match="lies outside optimizer group 0"):
        build_index(files, metas, inject_missing_state=True)
