"""AutoTP (tensor-parallel) checkpoints written by real DeepSpeed (a tiny random-weight Llama and a custom module):
output equal to ds_to_universal.py, and DeepSpeed's load_universal resumes at another TP size."""
import os

import pytest
import torch

from uckpt.tools.compare import checkpoint_files, compare_universal, load_state
from helpers.checks import assert_same_state, partial_folders


@pytest.mark.parametrize("name,nproc", [("tp2-dp2-z2-bf16", 1), ("tp2-dp2-z2-bf16", 3), ("tp2-dp1-z1-fp32", 2),
                                        ("tp2-dp1-z3-bf16", 1), ("tp2-dp1-z3-bf16", 2), ("tp2-custom-z2-fp32", 2),
                                        ("tp2-llama8h-z1-bf16", 1), ("tp3-custom-z1-bf16", 2)])
def test_autotp_matches_deepspeed(store, name, nproc):
    ours, theirs = store.universal_pair(name, nproc)
    assert len(checkpoint_files(ours)) > 30
    assert compare_universal(ours, theirs) == []
    if "custom" in name:  # the fused layer: two sub-parameters with their per-rank widths (uneven at TP=3)
        gate_up = load_state(ours, "blocks.1.gate_up.weight", "exp_avg_sq")
        assert gate_up["param"].shape == (256, 64)  # merged by its affine map, which DeepSpeed tags with nothing
        assert load_state(ours, "blocks.0.down.weight", "fp32")["param"].shape == (64, 128)
        return
    head = load_state(ours, "lm_head.weight", "fp32")
    assert head["vocab_tensor"] is True and head["param"].shape == (128, 64)  # merged from two [64, 64] slices
    q = load_state(ours, "model.layers.0.self_attn.k_proj.weight", "exp_avg")
    assert q["param"].shape == (32, 64)  # GQA: 2 kv heads x 16


def test_autotp_resume_at_tp1_matches_deepspeed_conversion(store):
    """Saved at TP=2 x DP=2, resumed at TP=1 x DP=2 from uckpt's and from DeepSpeed's conversion."""
    ours, theirs = store.universal_pair("tp2-dp2-z2-bf16", 2)
    runs = store.resumes("tp2-dp2-z2-bf16", 2, ("--tp", "1", "--zero-stage", "2", "--dtype", "bf16"), ours, theirs)
    for label in ("ds@ours", "uckpt@ours", "uckpt@theirs"):
        _same_tp_state(runs[label], runs["ds@theirs"], min_params=11)
    # at TP=1 the engine holds the full merged tensors of the Universal files
    full = load_state(ours, "model.layers.1.mlp.down_proj.weight", "fp32")["param"]
    assert torch.equal(runs["ds@ours"].state["params"]["model.layers.1.mlp.down_proj.weight"], full)
    reference = store.reference_losses("tp2-dp2-z2-bf16")[2:4]
    assert runs["ds@ours"].losses == pytest.approx(reference, rel=2e-2)


def _same_tp_state(ours, theirs, min_params=6):
    """Two resumed engines (:class:`helpers.store.Loaded`) agree (test_resume's check), after 2 saved
    steps, with the same next losses."""
    assert_same_state(ours.state, theirs.state)
    assert ours.state["global_steps"] == 2
    assert all(len(ours.state[key]) >= min_params for key in ("params", "exp_avg", "exp_avg_sq"))
    assert ours.losses == theirs.losses


def test_custom_module_resume_at_tp1(store):
    """The custom-spec module saved at TP=2, resumed at TP=1 x DP=2: DeepSpeed's loader on uckpt's and on
    DeepSpeed's conversion, and uckpt's loader, reach one state; the fused layer is whole again."""
    name = "tp2-custom-z2-fp32"
    ours_u, theirs_u = store.universal_pair(name, 2)
    args = ("--model", "custom", "--tp", "1", "--zero-stage", "2", "--dtype", "fp32")
    runs = store.resumes(name, 2, args, ours_u, theirs_u)
    ours, theirs = runs["ds@ours"], runs["ds@theirs"]
    for label in ("ds@ours", "uckpt@ours", "uckpt@theirs"):
        _same_tp_state(runs[label], theirs)
    full = load_state(ours_u, "blocks.0.gate_up.weight", "fp32")["param"]
    assert torch.equal(ours.state["params"]["blocks.0.gate_up.weight"], full)
    reference = store.reference_losses(name)[2:]  # the saved run trained one step past the save
    assert ours.losses[:len(reference)] == pytest.approx(reference, rel=2e-2)


def test_llama_resume_at_tp4(store):
    """Saved at TP=2, resumed at TP=4 (8 heads, 4 kv heads): the same state (rank 0's TP shards) and losses
    through DeepSpeed's loader on both conversions and through uckpt's loader."""
    name = "tp2-llama8h-z1-bf16"
    ours_u, theirs_u = store.universal_pair(name, 1)
    args = ("--heads", "8", "--kv-heads", "4", "--tp", "4", "--zero-stage", "1", "--dtype", "bf16")
    runs = store.resumes(name, 4, args, ours_u, theirs_u)
    ours, theirs = runs["ds@ours"], runs["ds@theirs"]
    for label in ("ds@ours", "uckpt@ours", "uckpt@theirs"):
        _same_tp_state(runs[label], theirs)
    k = ours.state["params"]["model.layers.0.self_attn.k_proj.weight"]
    assert k.shape == (8, 64)  # a quarter of 4 kv heads x 8
    reference = store.reference_losses(name)[2:]  # the saved run trained one step past the save
    assert ours.losses[:len(reference)] == pytest.approx(reference, rel=2e-2)


@pytest.mark.parametrize("tp", [1, 2])
def test_uneven_tp3_resume(store, tp):
    """Saved at TP=3, where every split is uneven (per-rank shapes, sub-parameter shard widths), resumed at
    TP=2 and TP=1 through DeepSpeed's loader on both conversions and through uckpt's loader."""
    name = "tp3-custom-z1-bf16"
    ours_u, theirs_u = store.universal_pair(name, 2)
    args = ("--model", "custom", "--tp", str(tp), "--zero-stage", "1", "--dtype", "bf16")
    runs = store.resumes(name, tp, args, ours_u, theirs_u)
    ours, theirs = runs["ds@ours"], runs["ds@theirs"]
    for label in ("ds@ours", "uckpt@ours", "uckpt@theirs"):
        _same_tp_state(runs[label], theirs)
    reference = store.reference_losses(name)[2:]  # the saved run trained one step past the save
    assert ours.losses[:len(reference)] == pytest.approx(reference, rel=2e-2)


def test_diverged_replicas_name_the_parameter(copy_tag, tmp_path, capsys):
    """A TP-replicated parameter whose copies differ (here: TP rank 1's fp32 master of norm.weight edited)
    fails with the parameter, the ranks and the largest difference; nothing is left in the output."""
    from uckpt.tools import cli

    tag = copy_tag("tp2-custom-z2-fp32")
    path = os.path.join(tag, "zero_pp_rank_0_mp_rank_01_optim_states.pt")
    sd = torch.load(path, weights_only=False)
    osd = sd["optimizer_state_dict"]
    g = next(i for i, m in enumerate(osd["param_slice_mappings"]) if "norm.weight" in m)
    at = osd["param_slice_mappings"][g]["norm.weight"]
    with torch.no_grad():
        osd["single_partition_of_fp32_groups"][g].narrow(0, at.start, at.numel).add_(0.5)
    torch.save(sd, path)
    out = str(tmp_path / "out" / "u")
    rc = cli.main(["convert", "--quiet", "--input_folder", tag, "--output_folder", out])
    err = capsys.readouterr().err
    assert rc == 2
    assert "fp32 of TP-replicated parameter 'norm.weight' differs between TP rank 0 and 1 (max abs difference 0.5)" \
        in err
    assert not os.path.exists(out) and partial_folders(out) == []
