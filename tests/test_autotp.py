"""AutoTP (tensor-parallel) checkpoints written by real DeepSpeed (a tiny random-weight Llama):
output equal to ds_to_universal.py, and DeepSpeed's load_universal resumes at another TP size."""
import pytest
import torch

from uckpt.compare import checkpoint_files, compare_universal, load_state


@pytest.mark.parametrize("name,nproc", [("tp2-dp2-z2-bf16", 1), ("tp2-dp2-z2-bf16", 3), ("tp2-dp1-z1-fp32", 2),
                                        ("tp2-dp1-z3-bf16", 1), ("tp2-dp1-z3-bf16", 2)])
def test_autotp_matches_deepspeed(store, name, nproc):
    ours, theirs = store.universal_pair(name, nproc)
    assert len(checkpoint_files(ours)) > 40
    assert compare_universal(ours, theirs) == []
    head = load_state(ours, "lm_head.weight", "fp32")
    assert head["vocab_tensor"] is True and head["param"].shape == (128, 64)  # merged from two [64, 64] slices
    q = load_state(ours, "model.layers.0.self_attn.k_proj.weight", "exp_avg")
    assert q["param"].shape == (32, 64)  # GQA: 2 kv heads x 16


def test_autotp_resume_at_tp1_matches_deepspeed_conversion(store):
    """Saved at TP=2 x DP=2, resumed at TP=1 x DP=2 from uckpt's and from DeepSpeed's conversion."""
    ours, theirs = store.universal_pair("tp2-dp2-z2-bf16", 2)
    args = ("--tp", "1", "--zero-stage", "2", "--dtype", "bf16")
    state_ours, report_ours = store.resume("tp2-dp2-z2-bf16", ours, 2, *args)
    state_ds, report_ds = store.resume("tp2-dp2-z2-bf16", theirs, 2, *args)
    assert state_ours["global_steps"] == state_ds["global_steps"] == 2
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert state_ours[key].keys() == state_ds[key].keys() and len(state_ours[key]) > 10
        for pname in state_ours[key]:
            assert torch.equal(state_ours[key][pname], state_ds[key][pname]), (key, pname)
    assert state_ours["step"] == state_ds["step"]
    assert report_ours["losses"] == report_ds["losses"]
    # at TP=1 the engine holds the full merged tensors of the Universal files
    full = load_state(ours, "model.layers.1.mlp.down_proj.weight", "fp32")["param"]
    assert torch.equal(state_ours["params"]["model.layers.1.mlp.down_proj.weight"], full)
    reference = store.reference_losses("tp2-dp2-z2-bf16")[2:4]
    assert report_ours["losses"] == pytest.approx(reference, rel=2e-2)
