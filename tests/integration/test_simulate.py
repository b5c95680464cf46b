"""The scaling model (``uckpt plan --simulate``) against real conversions: for real DeepSpeed
checkpoints, the metadata written from the model's layout by DeepSpeed's partition rules
(:mod:`uckpt.dsformat.synthetic`, no shard opened) plans the same conversion, and the cost model
predicts, rank by rank, the bytes each real run on N = 1 ... 4 ranks counted in its report."""
import json
import os

import pytest
import torch

from examples import pipe_train
from examples.tiny_train import TinyLM, param_groups
from uckpt.conversion.costs import rank_costs
from uckpt.conversion.plan import make_plan
from uckpt.dsformat import synthetic
from uckpt.dsformat.files import discover
from uckpt.dsformat.index import build_index
from uckpt.dsformat.shards import load_shard, source_meta

RECIPES = {"z2-bf16-dp4": synthetic.Parallel(dp=4, zero_stage=2), "z3-bf16-dp2": synthetic.Parallel(dp=2, zero_stage=3),
           # AutoEP (the store's tiny Mixtral): expert groups over dp / ep ranks, both expert-data layouts
           "ep2-dp2-z2-bf16": synthetic.Parallel(dp=2, ep=2, zero_stage=2),
           "ep2-dp4-z1-fp32": synthetic.Parallel(dp=4, ep=2, zero_stage=1, dtype=synthetic.Dtype.FP32),
           "ep2-dp4-z2-bf16-dbep": synthetic.Parallel(dp=4, ep=2, zero_stage=2, data_before_ep=True),
           # AutoTP (the store's tiny Llama): split, vocabulary and replicated parameters, ZeRO-1/2/3
           "tp2-dp2-z2-bf16": synthetic.Parallel(dp=2, tp=2, zero_stage=2),
           "tp2-dp1-z1-fp32": synthetic.Parallel(dp=1, tp=2, zero_stage=1, dtype=synthetic.Dtype.FP32),
           "tp2-dp1-z3-bf16": synthetic.Parallel(dp=1, tp=2, zero_stage=3),
           # pipeline (pipe_train's PipelineModule: weights in layer files, an embedding tied across stages)
           "pp2-dp1": synthetic.Parallel(dp=1, pp=2, zero_stage=1), "pp2-dp2": synthetic.Parallel(dp=2, pp=2, zero_stage=1)}
# converter sizes checked: the conversions other tests make anyway, and N=4 on two 4-file checkpoints
RANKS = {"z2-bf16-dp4": (1, 2, 3, 4), "z3-bf16-dp2": (1, 2, 3), "ep2-dp2-z2-bf16": (1, 2), "ep2-dp4-z1-fp32": (3, 4),
         "ep2-dp4-z2-bf16-dbep": (2,), "tp2-dp2-z2-bf16": (1, 2, 3), "tp2-dp1-z1-fp32": (2,), "tp2-dp1-z3-bf16": (1, 2),
         "pp2-dp1": (1, 2), "pp2-dp2": (2,)}
TINY_MIXTRAL = (32, 2, 4, 2, 64, 128, 8)  # autoep_train.build_model: hidden, layers, heads, kv heads, I, vocab, E
TINY_LLAMA = (64, 2, 4, 2, 128, 128)  # autotp_train.build_model: hidden, layers, heads, kv heads, I, vocab


def pipe_layout() -> synthetic.ModelLayout:
    """pipe_train's PipelineModule (layers: tied embedding, Linear, Tanh | Linear, LayerNorm, tied head
    over 2 stages, one optimizer group): each stage's optimizer holds the tied embedding; its weights
    are saved once, in layer 0's file."""
    h, v = pipe_train.HIDDEN, pipe_train.VOCAB
    E = synthetic.Entry  # noqa: N806
    return synthetic.ModelLayout("pipe", (
        E("tied_modules.embed.weight", (v, h), 0, stage=0, layer=0), E("1.weight", (h, h), 0, stage=0, layer=1),
        E("1.bias", (h,), 0, stage=0, layer=1), E("tied_modules.embed.weight", (v, h), 0, stage=1),
        E("3.weight", (h, h), 0, stage=1, layer=3), E("3.bias", (h,), 0, stage=1, layer=3),
        E("4.weight", (h,), 0, stage=1, layer=4), E("4.bias", (h,), 0, stage=1, layer=4)), groups=1,
        weightless_layers={2: 0})  # the Tanh


def layout_of(name: str) -> synthetic.ModelLayout:
    par = RECIPES[name]
    if par.pp > 1:
        return pipe_layout()
    if par.ep > 1:
        return synthetic.mixtral(TINY_MIXTRAL)
    return synthetic.llama(TINY_LLAMA, groups=1) if par.tp > 1 else tiny_layout(par.zero_stage)


def conversion(store, name: str, n: int) -> str:
    """A real conversion of ``name`` on ``n`` ranks, as the other tests make it: with injected UC info
    for the plain models, without for AutoTP / AutoEP (whose model files carry their own)."""
    return store.uckpt_universal(name, n) if store.injects(name) else store.universal_pair(name, n)[0]


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
    files, metas = synthetic.synthesize(layout_of(name), RECIPES[name], folder=tag)
    assert [(s.path, s.kind) for s in files.sources] == [(s.path, s.kind) for s in real_files.sources]
    assert sorted(files.expert_files) == sorted(real_files.expert_files)
    assert sorted(files.layer_files) == sorted(real_files.layer_files)
    assert bool(files.layer_files) == (RECIPES[name].pp > 1) and bool(files.expert_files) == (RECIPES[name].ep > 1)
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
            assert meta.use_data_before_expert_parallelism == real[i].use_data_before_expert_parallelism
            keys = ("moe_layer_id", "module_path", "num_experts", "num_local_experts", "ep_size", "expert_key_prefix",
                    "ep_rank")
            assert [{k: e[k] for k in keys} for e in meta.autoep_layers or []] == \
                   [{k: e[k] for k in keys} for e in real[i].autoep_layers or []]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_simulated_bytes_equal_the_reports(store, name):
    tag = store.tag(name)
    sizes = {n: os.path.getsize(os.path.join(tag, n)) for n in os.listdir(tag)}  # sizes only: no file is read
    files, metas = synthetic.synthesize(layout_of(name), RECIPES[name], sizes, folder=tag)
    index = build_index(files, metas, inject_missing_state=store.injects(name))
    for n in RANKS[name]:
        with open(os.path.join(conversion(store, name, n), "uckpt_report.json")) as f:
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
            # the CRC pass: the files the run opened and this rank's share of the others, whole, against
            # the records the run counted in them (each file's container is not a record)
            checked = [*measured["opened"], *index.files.unread_share(row.rank, n)]
            assert row.crc_bytes == sum(os.path.getsize(p) for p in checked), (n, row.rank)
            assert 0 <= row.crc_bytes - measured["crc_checked_bytes"] <= synthetic.FILE_ALLOWANCE * len(checked)
        assert sum(r.sent_bytes for r in predicted) == sum(r.received_bytes for r in predicted)
        if n > 1:
            assert sum(r.sent_bytes for r in predicted) > 0  # the exchange is exercised, not only local reads
