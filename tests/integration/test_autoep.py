"""AutoEP checkpoints written by real DeepSpeed (a tiny random-weight Mixtral, 8 experts, autoep_size 2):
output equal to ds_to_universal.py, resumption at autoep_size 1 and 4 through DeepSpeed's loader and
uckpt's, and every failure case of the guide on damaged copies of a real checkpoint."""
import os
import shutil

import pytest
import torch

import uckpt
from uckpt.tools import cli
from uckpt.dsformat import constants as C
from uckpt.tools.compare import compare_universal, load_state
from uckpt.errors import CheckpointError
from helpers.checks import assert_same_state


EXPERT = "model.layers.1.mlp.experts.w2"


@pytest.mark.parametrize("name,nproc", [("ep2-dp2-z2-bf16", 1), ("ep2-dp2-z2-bf16", 2), ("ep2-dp4-z1-fp32", 3),
                                        ("ep2-dp4-z2-bf16-dbep", 2), ("ep2-dp2-z3-bf16", 2),
                                        ("ep2-dp4-z3-fp32", 3)])
def test_autoep_matches_deepspeed(store, name, nproc):
    ours, theirs = store.universal_pair(name, nproc)
    assert compare_universal(ours, theirs) == []
    w2 = load_state(ours, EXPERT, "exp_avg")
    assert w2["is_expert_param"] is True and w2["ep_num_experts"] == 8 and w2["param"].shape == (8, 32, 64)
    model_file = "mp_rank_00_model_states.pt" if "z3" not in name else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    info = torch.load(os.path.join(ours, model_file), weights_only=False)[C.UNIVERSAL_CHECKPOINT_INFO]
    assert [e["num_experts"] for e in info[C.AUTOEP_LAYERS_KEY]] == [8, 8]


def test_expert_rows_are_the_saved_experts(store):
    """Expert g of the consolidated tensor is the bf16 weight DeepSpeed saved in expert g's own file."""
    name = "ep2-dp2-z2-bf16"
    ours, _ = store.universal_pair(name, 2)
    full = load_state(ours, EXPERT, "fp32")["param"]
    for g in range(8):
        saved = torch.load(os.path.join(store.tag(name), f"layer_1_expert_{g}_mp_rank_00_model_states.pt"),
                           weights_only=False)[f"{EXPERT}.{g}"]
        assert torch.equal(full[g].to(saved.dtype), saved), g


@pytest.mark.parametrize("name,stage,ep,world", [("ep2-dp2-z2-bf16", "2", 1, 2), ("ep2-dp2-z2-bf16", "2", 4, 4),
                                                ("ep2-dp2-z3-bf16", "3", 1, 2), ("ep2-dp2-z3-bf16", "3", 2, 2)])
def test_resume_at_other_autoep_size(store, name, stage, ep, world):
    """Saved at autoep_size 2 (ZeRO-2, and partition-native ZeRO-3), resumed at another autoep_size: from
    uckpt's conversion with DeepSpeed's loader and with uckpt's, the same state as DeepSpeed's loader on
    DeepSpeed's own conversion, and the same losses."""
    ours_u, theirs_u = store.universal_pair(name, 2)
    runs = store.resumes(name, world, ("--ep", str(ep), "--zero-stage", stage, "--dtype", "bf16"), ours_u, theirs_u)
    theirs = runs["ds@theirs"]
    for label in ("ds@ours", "uckpt@ours", "uckpt@theirs"):
        assert_same_state(runs[label].state, theirs.state)
        assert runs[label].losses == theirs.losses, label
    assert EXPERT in theirs.state["params"] and theirs.state["global_steps"] == 2
    reference = store.reference_losses(name)[2:4]
    assert runs["ds@ours"].losses == pytest.approx(reference, rel=2e-2)


def _convert(capsys, tag, out):
    rc = cli.main(["convert", "--quiet", "--input_folder", tag, "--output_folder", out])
    return rc, capsys.readouterr().err


def test_missing_expert_file(copy_tag, tmp_path, capsys):
    tag = copy_tag("ep2-dp2-z2-bf16")
    os.remove(os.path.join(tag, "layer_1_expert_5_mp_rank_00_model_states.pt"))
    with pytest.raises(FileNotFoundError, match="layer_1_expert_5_mp_rank_.*is missing"):
        uckpt.convert(tag, str(tmp_path / "out" / "u"))
    rc, err = _convert(capsys, tag, str(tmp_path / "out2" / "u"))
    assert rc != 0 and "layer_1_expert_5" in err


def test_two_mp_rank_files_for_one_expert(copy_tag, tmp_path):
    tag = copy_tag("ep2-dp2-z2-bf16")
    shutil.copy(os.path.join(tag, "layer_0_expert_3_mp_rank_00_model_states.pt"),
                os.path.join(tag, "layer_0_expert_3_mp_rank_01_model_states.pt"))
    with pytest.raises(NotImplementedError, match="layer 0, expert 3.*AutoEP \\+ AutoTP"):
        uckpt.convert(tag, str(tmp_path / "out" / "u"))


def test_expert_files_without_autoep_metadata(copy_tag, tmp_path):
    """The guide's rule for native DeepSpeed-MoE / Megatron-DeepSpeed expert files (DeepSpeed 0.19.8's
    converter skips them silently)."""
    tag = copy_tag("ep2-dp2-z2-bf16")
    path = os.path.join(tag, "mp_rank_00_model_states.pt")
    sd = torch.load(path, weights_only=False)
    del sd[C.AUTOEP_LAYERS_KEY]
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="no ds_autoep_layers.*model-specific migration step"):
        uckpt.convert(tag, str(tmp_path / "out" / "u"))


def test_zero3_legacy_autoep_format_refused(copy_tag, tmp_path):
    tag = copy_tag("ep2-dp2-z3-bf16")
    for f in os.listdir(tag):
        if f.endswith("_model_states.pt"):
            sd = torch.load(os.path.join(tag, f), weights_only=False)
            for entry in sd[C.AUTOEP_LAYERS_KEY]:
                entry["checkpoint_format"] = "per_expert_files"  # what a pre-partition-native save recorded
            torch.save(sd, os.path.join(tag, f))
    with pytest.raises(NotImplementedError, match="AutoEP currently requires ZeRO Stage 1 or 2"):
        uckpt.convert(tag, str(tmp_path / "out" / "u"))


def test_expert_count_must_divide_target_ep(store):
    ours, _ = store.universal_pair("ep2-dp2-z2-bf16", 2)
    for ep in (1, 2, 4, 8):
        sd = uckpt.load_state_dict(ours, uckpt.Topology(ep_rank=ep - 1, ep_size=ep), names=[EXPERT])
        assert sd[EXPERT].shape == (8 // ep, 32, 64)
        assert torch.equal(sd[EXPERT], load_state(ours, EXPERT, "fp32")["param"][(ep - 1) * 8 // ep:8])
    with pytest.raises(CheckpointError, match="8 experts, which do not divide over expert-parallel size 3"):
        uckpt.load_state_dict(ours, uckpt.Topology(ep_rank=0, ep_size=3), names=[EXPERT])


def test_inspect_reports_expert_parallelism(store):
    from uckpt.tools.inspect import inspect_path

    info = inspect_path(store.tag("ep2-dp4-z1-fp32"))
    assert info["ep"] == 2 and info["dp"] == 4 and info["convertible"] is True
    assert info["autoep_layers"] == [("model.layers.0.mlp.experts", 8), ("model.layers.1.mlp.experts", 8)]
    assert info["expert_files"] == 16


def test_expert_moments_missing_best_effort(copy_tag, store, tmp_path):
    """The guide's best-effort rule: expert optimizer entries absent -> fp32.pt still written, the skipped
    states named in the report (DeepSpeed 0.19.8 raises). A dense group without moments stays refused."""
    import json

    tag = copy_tag("ep2-dp2-z2-bf16")
    for r in (0, 1):
        path = os.path.join(tag, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        sd = torch.load(path, weights_only=False)
        state = sd["optimizer_state_dict"]["base_optimizer_state"]["state"]
        expert_group = next(g for g, m in enumerate(sd["optimizer_state_dict"]["param_slice_mappings"])
                            if EXPERT in m)
        for key in ("exp_avg", "exp_avg_sq"):
            del state[expert_group][key]
        torch.save(sd, path)
    out = str(tmp_path / "out" / "u")
    uckpt.convert(tag, out, log={"quiet": True})
    full, _ = store.universal_pair("ep2-dp2-z2-bf16", 2)
    assert sorted(os.listdir(os.path.join(out, "zero", EXPERT))) == ["fp32.pt", "step.pt"]
    assert torch.equal(load_state(out, EXPERT, "fp32")["param"], load_state(full, EXPERT, "fp32")["param"])
    assert torch.equal(load_state(out, "lm_head.weight", "exp_avg")["param"],
                       load_state(full, "lm_head.weight", "exp_avg")["param"])
    with open(os.path.join(out, "uckpt_report.json")) as f:
        notes = json.load(f)["notes"]
    assert any(EXPERT in n and "exp_avg, exp_avg_sq" in n for n in notes)

    tag2 = str(tmp_path / "dense" / os.path.basename(tag))
    shutil.copytree(store.tag("ep2-dp2-z2-bf16"), tag2)
    for r in (0, 1):
        path = os.path.join(tag2, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        sd = torch.load(path, weights_only=False)
        dense_group = next(g for g, m in enumerate(sd["optimizer_state_dict"]["param_slice_mappings"])
                           if not any(".experts." in n for n in m))
        del sd["optimizer_state_dict"]["base_optimizer_state"]["state"][dense_group]["exp_avg"]
        torch.save(sd, path)
    with pytest.raises(NotImplementedError, match="holds .* but not exp_avg"):
        uckpt.convert(tag2, str(tmp_path / "out2" / "u"))
