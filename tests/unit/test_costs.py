"""The synthetic layouts, the cost model and ``uckpt plan --simulate`` (pure: no file is read).
tests/integration/test_simulate.py checks both against real DeepSpeed checkpoints and reports."""
import json

import pytest

from uckpt.conversion.costs import rank_costs
from uckpt.conversion.plan import make_plan
from uckpt.dsformat import synthetic as S
from uckpt.dsformat.index import build_index
from uckpt.errors import UckptError
from uckpt.tools.cli import main


def _layout(*sizes, groups=1):
    return S.ModelLayout("t", tuple(S.Entry(f"p{i}", (n,), group=0) for i, n in enumerate(sizes)), groups=groups)


def test_zero12_partitions_pad_the_group_to_twice_dp_and_record_each_run():
    files, metas = S.synthesize(_layout(5, 3, 1), S.Parallel(dp=2, zero_stage=2))
    optims = [metas[s.index] for s in files.optim_sources()]
    # 9 elements padded to 12 (a multiple of 2 x dp): partitions [0, 6) and [6, 12)
    assert [g.fp32_numel for m in optims for g in m.groups] == [6, 6]
    assert optims[0].groups[0].mappings == {"p0": (0, 5), "p1": (5, 1)}
    assert optims[1].groups[0].mappings == {"p1": (0, 2), "p2": (2, 1)}


def test_zero3_splits_groups_at_sub_group_size_of_partition_elements():
    files, metas = S.synthesize(_layout(8, 8, 8), S.Parallel(dp=2, zero_stage=3, sub_group_size=8))
    model = metas[files.model_sources()[0].index]
    assert [list(g) for g in model.param_shapes] == [["p0", "p1"], ["p2"]]  # 4 + 4 reaches 8, then the rest
    optim = metas[files.optim_sources()[0].index]
    assert [g.fp32_numel for g in optim.groups] == [8, 4]


def test_costs_move_every_byte_once_whatever_the_converter_size():
    files, metas = S.synthesize(S.layout("llama-8b"), S.Parallel(dp=4, tp=2, zero_stage=1))
    index = build_index(files, metas, inject_missing_state=True)
    totals = set()
    for n in (1, 3, 8):
        rows = rank_costs(index, make_plan(index, n, 4096 << 20))
        assert sum(r.sent_bytes for r in rows) == sum(r.received_bytes for r in rows)
        assert (n == 1) == (sum(r.sent_bytes for r in rows) == 0)
        assert sum(r.files_read for r in rows) == len(files.sources)
        totals.add((sum(r.read_bytes for r in rows), sum(r.written_bytes for r in rows)))
    assert len(totals) == 1
    (read, written), = totals
    # TP=2: the replicated embedding and norms are read twice and written once
    assert read > written > 3 * 4 * 8_000_000_000


@pytest.mark.parametrize("data_before_ep", [False, True])
def test_autoep_expert_groups_are_partitioned_over_the_ranks_of_one_ep_rank(data_before_ep):
    """DP=4 x EP=2: each DP rank's expert group holds its EP rank's 4 of 8 experts, cut over the 2 ranks
    that share them; the dense group is cut over all 4 (the ranks DeepSpeed's rule names)."""
    tiny = S.mixtral((32, 1, 4, 2, 64, 128, 8))
    files, metas = S.synthesize(tiny, S.Parallel(dp=4, ep=2, data_before_ep=data_before_ep))
    model = metas[files.model_sources()[0].index]
    assert model.param_shapes[1] == {f"model.layers.0.mlp.experts.w{k}": s
                                     for k, s in ((1, (4, 64, 32)), (2, (4, 32, 64)), (3, (4, 64, 32)))}
    assert not any(".experts." in k for k in model.module_shapes)
    assert [(e["num_local_experts"], e["ep_size"]) for e in model.autoep_layers] == [(4, 2)]
    assert len(files.expert_files) == 8 and len(files.sources) == 5  # per-expert files are not sources
    optims = [metas[s.index] for s in files.optim_sources()]
    expert_numel = 3 * 4 * 64 * 32
    assert [m.groups[1].fp32_numel for m in optims] == [expert_numel // 2] * 4
    # the second half of an EP rank's experts: DP rank 2 (EP ranks interleaved), or 1 (data before EP)
    second = 1 if data_before_ep else 2
    # its partition starts at 12288, inside w2 ([8192, 16384) of the EP rank's 24576 elements)
    assert optims[second].groups[1].mappings["model.layers.0.mlp.experts.w2"] == (0, 4096)
    index = build_index(files, metas, inject_missing_state=False)
    w2 = next(p for p in index.params if p.name.endswith("experts.w2"))
    assert tuple(w2.shape) == (8, 32, 64)
    rows = rank_costs(index, make_plan(index, 3, 4096 << 20))
    assert sum(r.sent_bytes for r in rows) == sum(r.received_bytes for r in rows) > 0


def test_mixtral_without_expert_parallelism_saves_its_experts_as_dense_weights():
    files, metas = S.synthesize(S.mixtral((32, 1, 4, 2, 64, 128, 8)), S.Parallel(dp=2))
    model = metas[files.model_sources()[0].index]
    assert model.module_shapes["model.layers.0.mlp.experts.w2"] == (8, 32, 64) and len(model.param_shapes) == 1
    assert not files.expert_files and not model.autoep_layers


def test_layout_errors_are_one_line():
    with pytest.raises(UckptError, match="does not divide by tp=3"):
        S.synthesize(S.layout("llama-8b"), S.Parallel(dp=2, tp=3))
    with pytest.raises(UckptError, match="ZeRO stage 0 and 1 only"):
        S.synthesize(S.layout("llama-8b"), S.Parallel(dp=2, pp=2, zero_stage=2))
    with pytest.raises(UckptError, match="has no routed experts"):
        S.synthesize(S.layout("llama-8b"), S.Parallel(dp=2, ep=2))
    with pytest.raises(UckptError, match="only AutoEP at ZeRO-1/2 without TP"):
        S.synthesize(S.layout("mixtral-8x7b"), S.Parallel(dp=2, ep=2, zero_stage=3))
    with pytest.raises(UckptError, match="not a multiple of ep=4"):
        S.synthesize(S.layout("mixtral-8x7b"), S.Parallel(dp=6, ep=4))
    with pytest.raises(UckptError, match="do not divide by ep=3"):
        S.synthesize(S.layout("mixtral-8x7b"), S.Parallel(dp=6, ep=3))


def test_cli_prints_and_writes_every_rank(tmp_path, capsys):
    out = tmp_path / "sim.json"
    ranks = [1, 2, 4, 8, 16, 32, 64]
    assert main(["plan", "--simulate", "llama-8b", "--dp", "8", "--ranks", ",".join(map(str, ranks)),
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llama-8b: ZeRO-2 bf16, dp=8" in text and "scaling stops near" in text
    sim = json.loads(out.read_text())
    assert [p["ranks"] for p in sim["points"]] == ranks
    assert [len(p["per_rank"]) for p in sim["points"]] == ranks
    assert sim["scaling_limit"]["ranks"] in ranks[1:-1]
    one, many = sim["points"][0], sim["points"][-1]
    assert many["read_bytes"]["max"] < one["read_bytes"]["max"] and many["predicted_s"] < one["predicted_s"]


def test_cli_simulates_expert_parallel_layouts(capsys):
    assert main(["plan", "--simulate", "mixtral-8x7b", "--dp", "16", "--ep", "8", "--ranks", "1,16"]) == 0
    text = capsys.readouterr().out
    assert "mixtral-8x7b: ZeRO-2 bf16, dp=16 tp=1 pp=1 ep=8: 17 files" in text
    assert main(["plan", "--simulate", "llama-8b", "--ep", "2", "--ranks", "1"]) == 2
    assert "llama-8b has no routed experts" in capsys.readouterr().err


def test_cli_refuses_options_of_a_real_conversion(capsys):
    assert main(["plan", "--simulate", "llama-8b", "--input_folder", "x"]) == 2
    assert "takes no input_folder" in capsys.readouterr().err
