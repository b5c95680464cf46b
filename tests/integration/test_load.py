"""uckpt.load_into_engine and uckpt.load_state_dict on real checkpoints: the same engine state as
DeepSpeed's load_universal where DeepSpeed works, and a correct one where it fails or is lossy
(ZeRO-1/2 <-> ZeRO-3, frozen parameters and buffers, per-group hyperparameters at ZeRO-3)."""
import os

import pytest
import torch

import uckpt
from uckpt.dsformat import constants as C
from uckpt.errors import CheckpointError
from examples import runner
from examples.runner import JobError

from helpers.store import CKPTS
from helpers.checks import assert_same_state, universal_value

UCKPT = ("--loader", "uckpt")


def _assert_holds_universal(state, universal, names=None):
    for key, st in (("params", "fp32"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
        assert len(state[key]) > 0
        for pname, value in state[key].items():
            if names is None or pname in names:
                assert torch.equal(value.flatten(), universal_value(universal, pname, st).flatten()), (key, pname)


@pytest.mark.parametrize("name,world,source", [("z2-bf16-dp4", 2, "uckpt"), ("z1-bf16-dp2", 3, "uckpt"),
                                               ("z2-bf16-dp4", 3, "deepspeed"), ("z3-bf16-dp2", 3, "uckpt")])
def test_same_state_as_deepspeed_loader(store, name, world, source):
    runs = store.resumes(name, world, (), store.uckpt_universal(name, 2), store.ds_universal(name))
    # DeepSpeed's loader and uckpt's on one folder: uckpt's conversion, or DeepSpeed's
    theirs, ours = (runs["ds@ours"], runs["uckpt@ours"]) if source == "uckpt" else (runs["ds@theirs"], runs["uckpt@theirs"])
    assert_same_state(ours.state, theirs.state)
    assert all(r["loader"] == "uckpt" and r["bytes_read"] > 0 for r in ours.loads)
    if "--zero-stage" in CKPTS[name].args and CKPTS[name].args[CKPTS[name].args.index("--zero-stage") + 1] == "3":
        # DeepSpeed's ZeRO-3 universal load gives every group param_groups[0]'s hyperparameters
        # (spec 6): the no-decay group resumes with weight decay 0.1. uckpt keeps each group's own.
        assert [g["weight_decay"] for g in theirs.state["groups"]] == [0.1, 0.1]
        assert [g["weight_decay"] for g in ours.state["groups"]] == [0.1, 0.0]
    else:
        assert ours.state["groups"] == theirs.state["groups"]
        assert ours.losses == theirs.losses
    reference = store.reference_losses(name)[3:5]
    assert ours.losses == pytest.approx(reference, rel=2e-2)


def test_frozen_params_and_buffers_restored(store):
    """A fresh model with other initial values (--seed 1): DeepSpeed's universal load leaves its frozen
    layer and buffer as initialised; uckpt restores the checkpoint's."""
    name = "z2-bf16-dp4"
    universal = store.uckpt_universal(name, 2)
    runs = store.resumes(name, 2, (*CKPTS[name].args, "--seed", "1"), universal)
    theirs, ours = runs["ds@ours"].state, runs["uckpt@ours"].state
    for pname, value in ours["frozen"].items():
        saved = universal_value(universal, pname, "fp32").to(value.dtype)
        assert torch.equal(value, saved), pname
        assert not torch.equal(theirs["frozen"][pname], saved), pname
    gain = ours["buffers"]["gain"]
    assert torch.equal(gain, universal_value(universal, "gain", "fp32").to(gain.dtype))
    assert not torch.equal(theirs["buffers"]["gain"], ours["buffers"]["gain"])
    _assert_holds_universal(ours, universal)


@pytest.mark.parametrize("name,world,target_stage", [("z2-bf16-dp4", 2, "3"), ("z3-bf16-dp2", 3, "2")])
def test_across_zero_families(store, name, world, target_stage):
    """DeepSpeed refuses these loads (its model-state file naming differs between the families); uckpt
    restores parameters, moments, step, group hyperparameters, frozen layer and buffer."""
    universal = store.uckpt_universal(name, 2)
    args = ("--zero-stage", target_stage, "--dtype", "bf16", "--seed", "1")
    ours, report = store.resume(name, universal, world, *args, *UCKPT)
    _assert_holds_universal(ours, universal)
    assert ours["global_steps"] == 3 and set(ours["step"]) == {3.0}
    assert [g["weight_decay"] for g in ours["groups"]] == [0.1, 0.0]
    held = [p for p in ours["frozen"] if os.path.isdir(os.path.join(universal, C.UNIVERSAL_ZERO_FOLDER, p))]
    # a ZeRO-3 save keeps no module weights, so neither converter writes frozen parameters for it
    assert bool(held) == (target_stage == "3") and ours["frozen"]
    for pname in held:
        value = ours["frozen"][pname]
        assert torch.equal(value, universal_value(universal, pname, "fp32").to(value.dtype)), pname
    reference = store.reference_losses(name)[3:5]
    assert report["losses"] == pytest.approx(reference, rel=2e-2)


def test_deepspeed_refuses_zero2_universal_in_zero3_run(store, tmp_path):
    universal = store.uckpt_universal("z2-bf16-dp4", 2)
    with pytest.raises(JobError):
        runner.train(2, "--zero-stage", "3", "--dtype", "bf16", "--steps", "1", "--load-dir",
                     os.path.dirname(universal))


def test_autotp_tp2_universal_into_tp1_and_tp2(store):
    name = "tp2-dp2-z2-bf16"
    ours_u, theirs_u = store.universal_pair(name, 2)
    for args, world in ((("--tp", "1", "--zero-stage", "2", "--dtype", "bf16"), 2),
                        (("--tp", "2", "--zero-stage", "1", "--dtype", "bf16"), 2)):
        runs = store.resumes(name, world, args, ours_u, theirs_u)
        for ours, theirs in (("uckpt@ours", "ds@ours"), ("uckpt@theirs", "ds@theirs")):
            assert_same_state(runs[ours].state, runs[theirs].state)
            assert runs[ours].losses == runs[theirs].losses


def test_missing_parameter_fails_on_every_rank(store, tmp_path):
    import shutil

    universal = store.uckpt_universal("z2-bf16-dp4", 2)
    broken = tmp_path / "u" / os.path.basename(universal)
    shutil.copytree(universal, broken)
    shutil.rmtree(broken / C.UNIVERSAL_ZERO_FOLDER / "blocks.1.weight")
    with pytest.raises(JobError) as exc:
        runner.train(2, "--zero-stage", "2", "--steps", "1", "--load-dir", str(broken.parent), "--load-tag",
                     broken.name, *UCKPT, timeout=240)
    # every rank checks every parameter before touching the engine, so none waits in a collective:
    # the job ends within the timeout, and torchrun reports the first rank's error
    assert "have no folder in the checkpoint: blocks.1.weight" in str(exc.value)


def test_shape_mismatch_names_parameter_and_shapes(store):
    universal = store.uckpt_universal("z2-bf16-dp4", 2)
    with pytest.raises(JobError) as exc:
        runner.train(1, "--zero-stage", "2", "--hidden", "48", "--steps", "1", "--load-dir",
                     os.path.dirname(universal), *UCKPT, timeout=240)
    assert "parameter embed.weight" in str(exc.value) and "[64, 32]" in str(exc.value) \
        and "[64, 48]" in str(exc.value)


def test_load_state_dict_gives_the_tp_shards_that_were_saved(store):
    """Without DeepSpeed: the TP=2 shards of the fp32 master, cast to bf16, are the bf16 weights each TP
    rank saved (spec 5, invariant 3), for every parameter of the AutoTP Llama."""
    name = "tp2-dp2-z2-bf16"
    universal, _ = store.universal_pair(name, 2)
    for tp_rank in range(2):
        module = torch.load(os.path.join(store.tag(name), f"mp_rank_{tp_rank:02d}_model_states.pt"),
                            weights_only=False)["module"]
        shapes = {k: v.shape for k, v in module.items()}
        sd = uckpt.load_state_dict(os.path.dirname(universal), uckpt.Topology(tp_rank=tp_rank, tp_size=2),
                                   dtype=torch.bfloat16, shapes=shapes, names=[k for k in module if
                                                                               os.path.isdir(os.path.join(
                                                                                   universal, "zero", k))])
        assert len(sd) > 10
        for pname, value in sd.items():
            assert torch.equal(value, module[pname]), pname
    both = uckpt.load_state_dict(universal, states=("fp32", "exp_avg"), names=["model.norm.weight"])
    assert set(both["model.norm.weight"]) == {"fp32", "exp_avg"}
    with pytest.raises(CheckpointError, match="no latest_universal"):
        uckpt.load_state_dict(store.tag(name))


def test_pipeline_engine(store):
    """A PipelineModule engine (PP=2, ZeRO-1, tied embedding) resumed at DP 1 -> 2 by uckpt's loader: the
    state DeepSpeed's loader reaches."""
    runs = store.resumes("pp2-dp1", 4, ("--stages", "2"), store.uckpt_universal("pp2-dp1", 2),
                         store.ds_universal("pp2-dp1"))
    for ours, theirs in (("uckpt@ours", "ds@ours"), ("uckpt@theirs", "ds@theirs")):
        assert_same_state(runs[ours].state, runs[theirs].state)
        assert runs[ours].losses == runs[theirs].losses
