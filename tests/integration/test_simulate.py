"""The scaling model (``uckpt plan --simulate``) against real conversions: for real DeepSpeed
checkpoints, the metadata written from the model's layout by DeepSpeed's partition rules
(:mod:`uckpt.dsformat.synthetic`, no shard opened) plans the same conversion, and the cost model
predicts, rank by rank, the bytes each real run on N = 1 ... 4 ranks counted in its report."""
import json
import os

import pytest
import torch

from examples.tiny_train import TinyLM, param_groups
from uckpt.conversion.costs import rank_costs
from uckpt.conversion.plan import make_plan
from uckpt.dsformat import synthetic
from uckpt.dsformat.files import discover
from uckpt.dsformat.index import build_index
from uckpt.dsformat.shards import load_shard, source_meta

RECIPES = {"z2-bf16-dp4": synthetic.Parallel(dp=4, zero_stage=2), "z3-bf16-dp2": synthetic.Parallel(dp=2, zero_stage=3)}
# converter sizes checked: the conversions other tests make anyway, and N=4 on the 4-file ZeRO-2 checkpoint
RANKS = {"z2-bf16-dp4": (1, 2, 3, 4), "z3-bf16-dp2": (1, 2, 3)}


def tiny_layout(zero_stage: int) -> synthetic.ModelLayout:
    """The state_dict of the store's TinyLM (tiny_train's defaults) as a layout: its optimizer groups
    are tiny_train's, its tied head an alias of the embedding, the frozen layer and buffer without state."""
    model = TinyLM(64, 32, 2, empty=zero_stage < 3)  # as tiny_train builds it
    group_of = {id(p): g for g, group in enumerate(param_groups(model, 0.1)) for p in group["params"]}
    named = dict(model.named_parameters())
    canonical = {id(p): n for n, p in named.items()}
    entries = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        alias = canonical[id(tensor)] if name not in named and id(tensor) in canonical else None
        buffer = not isinstance(tensor, torch.nn.Parameter)  # DeepSpeed casts parameters only
        entries.append(synthetic.Entry(name, tuple(tensor.shape), group_of.get(id(tensor)) if alias is None else None,
                                       alias_of=alias, itemsize=tensor.element_size() if buffer else None))
    return synthetic.ModelLayout("tiny", tuple(entries), groups=2)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_synthetic_metadata_equals_the_shards(store, name):
    tag = store.tag(name)
    real_files = discover(tag)
    real = {s.index: source_meta(s, load_shard(s.path), real_files.family) for s in real_files.sources}
    files, metas = synthetic.synthesize(tiny_layout(RECIPES[name].zero_stage), RECIPES[name], folder=tag)
    assert [(s.path, s.kind) for s in files.sources] == [(s.path, s.kind) for s in real_files.sources]
    for i, meta in metas.items():
        if hasattr(meta, "groups"):
            assert [(g.fp32_numel, g.state_numels, g.mappings) for g in meta.groups] == \
                   [(g.fp32_numel, g.state_numels, g.mappings) for g in real[i].groups], real_files.sources[i].path
        else:
            assert meta.param_shapes == real[i].param_shapes
            if RECIPES[name].zero_stage < 3:
                assert meta.module_shapes == real[i].module_shapes
                assert meta.module_nbytes == real[i].module_nbytes
                assert meta.shared_params == real[i].shared_params


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_simulated_bytes_equal_the_reports(store, name):
    tag = store.tag(name)
    sizes = {n: os.path.getsize(os.path.join(tag, n)) for n in os.listdir(tag)}  # sizes only: no file is read
    files, metas = synthetic.synthesize(tiny_layout(RECIPES[name].zero_stage), RECIPES[name], sizes, folder=tag)
    index = build_index(files, metas, inject_missing_state=True)
    for n in RANKS[name]:
        with open(os.path.join(store.uckpt_universal(name, n), "uckpt_report.json")) as f:
            report = json.load(f)
        plan = make_plan(index, n, report["plan"]["budget_bytes"])
        predicted = rank_costs(index, plan)
        assert len(report["plan"]["ranks"]) == n and len(plan.waves) == report["plan"]["waves"]
        for row, measured in zip(predicted, sorted(report["ranks"], key=lambda r: r["rank"])):
            got = {"read": measured["read_bytes"], "sent": measured["sent_bytes"],
                   "written": measured["payload_bytes"], "calls": measured["collective_calls"],
                   "files": len(measured["opened"])}
            want = {"read": row.read_bytes, "sent": row.sent_bytes, "written": row.written_bytes,
                    "calls": row.collective_calls, "files": row.files_read}
            assert got == want, (n, row.rank)
        assert sum(r.sent_bytes for r in predicted) == sum(r.received_bytes for r in predicted)
        if n > 1:
            assert sum(r.sent_bytes for r in predicted) > 0  # the exchange is exercised, not only local reads
