"""DeepSpeed's own ``load_universal`` resumes from uckpt's output at another DP size (and another
pipeline DP size) to the same state as from DeepSpeed's own conversion: parameters, Adam moments,
step and the next training losses."""
import pytest
import torch

from helpers.checks import assert_same_state, universal_value

RESUMES = [
    # (checkpoint, target world size, target args or () for the checkpoint's own)
    ("z2-bf16-dp4", 2, ()),
    ("z2-bf16-dp4", 3, ()),
    ("z1-bf16-dp2", 3, ()),
    ("z3-bf16-dp2", 3, ()),
]


@pytest.mark.parametrize("name,world,args", RESUMES)
def test_resume_matches_deepspeed_conversion(store, name, world, args):
    ours = store.uckpt_universal(name, 2)
    runs = store.resumes(name, world, args, ours, store.ds_universal(name))
    state_ours, losses_ours = runs["ds@ours"].state, runs["ds@ours"].losses
    assert_same_state(state_ours, runs["ds@theirs"].state)
    assert losses_ours == runs["ds@theirs"].losses
    # what the engine holds is what the Universal files hold
    for key, state in (("params", "fp32"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
        for pname, value in state_ours[key].items():
            assert torch.equal(value.flatten(), universal_value(ours, pname, state).flatten()), (key, pname)
    assert state_ours["global_steps"] == 3 and state_ours["step"][0] == 3.0
    # the resumed curve continues the uninterrupted one (other DP size: reduction order differs)
    reference = store.reference_losses(name)[3:5]
    assert losses_ours == pytest.approx(reference, rel=2e-2)


def test_pipeline_tied_across_stages_with_dp(store):
    """PP=2 x DP=2 with an embedding tied across stages (DeepSpeed's converter run with one worker
    each, see conftest._ds_workers: its default pools race on that parameter). uckpt reads the first
    stage, DeepSpeed keeps the last, and the values are the same. The run then resumes from uckpt's
    output at PP=2 x DP=1."""
    from uckpt.tools.compare import compare_universal

    ours, theirs = store.uckpt_universal("pp2-dp2", 2), store.ds_universal("pp2-dp2")
    assert compare_universal(ours, theirs) == []
    state, report = store.resume("pp2-dp2", ours, 2, "--stages", "2")
    assert state["global_steps"] == 2
    assert "tied_modules.embed.weight" in state["params"]
    for key, st in (("params", "fp32"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
        for pname, value in state[key].items():
            assert torch.equal(value, universal_value(ours, pname, st)), (key, pname)
    reference = store.reference_losses("pp2-dp2")[2:4]
    assert report["losses"] == pytest.approx(reference, rel=1e-3)


def test_pipeline_resume_matches_deepspeed_conversion(store):
    runs = store.resumes("pp2-dp1", 4, ("--stages", "2"), store.uckpt_universal("pp2-dp1", 2),
                         store.ds_universal("pp2-dp1"))
    assert_same_state(runs["ds@ours"].state, runs["ds@theirs"].state)
    assert runs["ds@ours"].losses == runs["ds@theirs"].losses
