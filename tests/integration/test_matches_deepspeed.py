"""uckpt's output equals DeepSpeed's ds_to_universal output on real checkpoints, for any number of
converter ranks (files, dict keys, torch.equal tensors), except the documented tied-alias difference."""
import os

import pytest
import torch

from uckpt.tools.compare import checkpoint_files, compare_universal, load_state
from helpers.checks import partial_folders

TIED_ALIAS = os.path.join("zero", "head.weight", "fp32.pt")

CASES = [
    ("z2-bf16-dp4", 1), ("z2-bf16-dp4", 2), ("z2-bf16-dp4", 3),
    ("z1-bf16-dp2", 1), ("z1-bf16-dp2", 3),
    ("z2-fp32-dp3", 1), ("z2-fp32-dp3", 2),
    ("z3-bf16-dp2", 1), ("z3-bf16-dp2", 3),
    ("z3-fp32-dp3", 2),
    ("pp2-dp1", 1), ("pp2-dp1", 2),
]


@pytest.mark.parametrize("name,nproc", CASES)
def test_same_files_keys_and_tensors(store, name, nproc):
    ours, theirs = store.uckpt_universal(name, nproc), store.ds_universal(name)
    assert checkpoint_files(ours) == checkpoint_files(theirs)
    assert len(checkpoint_files(ours)) > 10
    assert compare_universal(ours, theirs, skip=lambda rel: rel == TIED_ALIAS) == []


def test_small_memory_budget_converts_one_state_per_wave(store):
    ours = store.uckpt_universal("z2-bf16-dp4", 2, "--memory_budget_mb", "0")
    assert compare_universal(ours, store.ds_universal("z2-bf16-dp4"), skip=lambda rel: rel == TIED_ALIAS) == []


@pytest.mark.parametrize("name", ["z2-bf16-dp4", "z2-fp32-dp3"])
def test_tied_alias_gets_the_fp32_master(store, name):
    """DIFFERENCE (documented): DeepSpeed writes the alias from the bf16 module weight; uckpt from the master."""
    ours, theirs = store.uckpt_universal(name, 1), store.ds_universal(name)
    master = load_state(ours, "embed.weight", "fp32")["param"]
    alias = load_state(ours, "head.weight", "fp32")
    assert list(alias) == ["param"] and torch.equal(alias["param"], master)
    ds_alias = load_state(theirs, "head.weight", "fp32")["param"]
    assert torch.equal(ds_alias, master.to(ds_alias.dtype) if name.endswith("fp32-dp3") else
                       master.to(torch.bfloat16).float())
    if "bf16" in name:
        assert not torch.equal(ds_alias, master)  # DeepSpeed's copy really is lossy here


def test_every_parameter_kind_is_written(store):
    ours = store.uckpt_universal("z2-bf16-dp4", 2)
    folders = {os.path.dirname(f).split(os.sep)[-1] for f in checkpoint_files(ours) if f.startswith("zero" + os.sep)}
    # trainable (two groups), tied alias, frozen layer, buffer, zero-size parameter
    for name in ("embed.weight", "blocks.0.weight", "norm.bias", "head.weight", "frozen.weight", "gain", "empty"):
        assert name in folders
    assert load_state(ours, "empty", "fp32")["param"].shape == (0,)
    step = load_state(ours, "blocks.0.bias", "step")
    assert torch.is_tensor(step) and step.item() == 3.0
    groups = torch.load(os.path.join(ours, "zero", "optimizer_state.pt"), weights_only=False)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_each_file_is_read_by_one_rank_and_no_temp_folder(store):
    import json
    out = store.uckpt_universal("z2-bf16-dp4", 3)
    with open(os.path.join(out, "uckpt_report.json")) as f:
        report = json.load(f)
    opened = [p for r in report["ranks"] for p in r["opened"]]
    assert sorted(opened) == sorted(set(opened)) and len(opened) == report["checkpoint"]["files"] == 5
    assert len(report["ranks"]) == 3
    assert not any(name.startswith("tmp") for name in os.listdir(out))
    assert partial_folders(out) == []


def test_latest_universal_points_at_the_output(store):
    out = store.uckpt_universal("z3-bf16-dp2", 1)
    with open(os.path.join(os.path.dirname(out), "latest_universal")) as f:
        assert f.read() == os.path.basename(out)
