"""DeepSpeed's load flags with uckpt's loader (``load_optimizer_states``, ``load_module_only``,
``load_lr_scheduler_states``, ``load_module_strict``), its error types and the opt-in routing of
``engine.load_checkpoint``, against DeepSpeed's own loader given the same flags, on real checkpoints.

Each job loads every variant into a fresh engine in turn (one start-up for many loads). Weights-only
loads by uckpt read a copy of the Universal folder whose moment, step and optimizer_state files are
deleted: they succeed, so they never open those files.
"""
import os
import shutil

import pytest
import torch

from uckpt.dsformat import constants as C
from helpers.store import CKPTS

STRIPPED = (C.EXP_AVG_KEY + ".pt", C.EXP_AVG_SQ_KEY + ".pt", C.STEP_KEY + ".pt")


def _copy(universal: str, dest: str) -> str:
    """A copy of ``universal``'s parent folder (it holds latest_universal); returns the copy's parent."""
    shutil.copytree(os.path.dirname(universal), dest)
    return dest


def _weights_only_copy(universal: str, dest: str) -> str:
    root = _copy(universal, dest)
    zero = os.path.join(root, os.path.basename(universal), C.UNIVERSAL_ZERO_FOLDER)
    os.remove(os.path.join(zero, C.UNIVERSAL_OPTIMIZER_STATE_FILE))
    for name in os.listdir(zero):
        for f in STRIPPED:
            if os.path.isfile(os.path.join(zero, name, f)):
                os.remove(os.path.join(zero, name, f))
    return root


def _weights_only_pairs(stripped: str, ours_module_only: str = "uckpt"):
    """DeepSpeed's loader and uckpt's (reading the copy without moment files), with each weights-only flag."""
    return [{"name": "ds-noopt", "loader": "deepspeed", "load_optimizer_states": False},
            {"name": "uc-noopt", "loader": "uckpt", "load_optimizer_states": False, "load_dir": stripped},
            {"name": "ds-mod", "loader": "deepspeed", "load_module_only": True},
            {"name": "uc-mod", "loader": ours_module_only, "load_module_only": True, "load_dir": stripped}]


def _assert_weights_only_pairs(runs):
    """uckpt's weights-only loads hold DeepSpeed's weights, no moments and no step, and the same first loss."""
    for ours, theirs in (("uc-noopt", "ds-noopt"), ("uc-mod", "ds-mod")):
        a, b = runs[ours], runs[theirs]
        _same(a.state, b.state, keys=("params",))
        assert a.state["exp_avg"] == {} and a.state["step"] == []
        assert a.losses[0] == b.losses[0] and _client_keys(a) == _client_keys(b)


def _same(a: dict, b: dict, keys=("params", "exp_avg", "exp_avg_sq")):
    for key in keys:
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def _client_keys(result) -> set:
    return set(result.loads[0]["client_types"])


def _error(result) -> dict:
    assert all("error" in info for info in result.loads), result.loads
    return result.loads[0]


@pytest.fixture(scope="module")
def dense(store, tmp_path_factory):
    """ZeRO-2 bf16 DP=2 with a WarmupLR scheduler, resumed at DP=3 (ZeRO-2 and ZeRO-1)."""
    name = "z2-bf16-dp2-sched"
    universal = store.uckpt_universal(name, 2)
    tmp = tmp_path_factory.mktemp("flags")
    stripped = _weights_only_copy(universal, str(tmp / "stripped"))
    renamed = _copy(universal, str(tmp / "renamed"))
    zero = os.path.join(renamed, os.path.basename(universal), C.UNIVERSAL_ZERO_FOLDER)
    shutil.rmtree(os.path.join(zero, "blocks.1.weight"))
    shutil.copytree(os.path.join(zero, "blocks.0.weight"), os.path.join(zero, "extra.weight"))
    variants = [
        {"name": "ds", "loader": "deepspeed"}, {"name": "uc", "loader": "uckpt"}, {"name": "hook", "loader": "hook"},
        {"name": "ds-noopt", "loader": "deepspeed", "load_optimizer_states": False},
        {"name": "uc-noopt", "loader": "uckpt", "load_optimizer_states": False, "load_dir": stripped},
        {"name": "ds-mod", "loader": "deepspeed", "load_module_only": True},
        {"name": "uc-mod", "loader": "uckpt", "load_module_only": True, "load_dir": stripped},
        {"name": "hook-mod", "loader": "hook", "load_module_only": True, "load_dir": stripped},
        {"name": "uc-nosched", "loader": "uckpt", "load_lr_scheduler_states": False},
        {"name": "ds-z1-mod", "loader": "deepspeed", "load_module_only": True, "zero_stage": 1},
        {"name": "uc-z1-mod", "loader": "uckpt", "load_module_only": True, "zero_stage": 1, "load_dir": stripped},
        {"name": "uc-strict", "loader": "uckpt", "load_dir": renamed, "expect_error": True},
        {"name": "uc-lenient", "loader": "uckpt", "load_dir": renamed, "load_module_strict": False},
        {"name": "uc-shape", "loader": "uckpt", "hidden": 48, "expect_error": True},
        {"name": "fresh", "load_dir": None},
    ]
    return store.load_variants(name, os.path.dirname(universal), 3, CKPTS[name].args, variants)


def test_default_flags_equal_deepspeed_and_the_hook_routes_to_uckpt(dense):
    ds, uc, hook = dense["ds"], dense["uc"], dense["hook"]
    _same(uc.state, ds.state)
    assert uc.state["step"] == ds.state["step"] == [3.0, 3.0] and uc.state["global_steps"] == 3
    assert uc.state["lr_scheduler"] == ds.state["lr_scheduler"]
    assert uc.state["lr_scheduler"]["last_batch_iteration"] == 2
    assert uc.state["groups"] == ds.state["groups"] and uc.losses == ds.losses
    assert _client_keys(uc) == _client_keys(ds) == _client_keys(hook)
    assert uc.loads[0]["load_path"] == ds.loads[0]["load_path"]
    # engine.load_checkpoint went to uckpt's loader (its report), and reached the same state
    assert all(info["optimizer_states"] is True and info["bytes_read"] > 0 for info in hook.loads)
    _same(hook.state, uc.state)
    assert hook.losses == uc.losses


def test_weights_only_load_leaves_the_optimizer_as_initialised(dense):
    """load_optimizer_states=False: weights, counters and scheduler restored, no moment file opened.
    DeepSpeed 0.19.8's ZeRO-1/2 universal path ignores the flag and restores the moments (documented)."""
    ds, uc, fresh, full = dense["ds-noopt"], dense["uc-noopt"], dense["fresh"], dense["uc"]
    _same(uc.state, ds.state, keys=("params",))
    _same(uc.state, fresh.state, keys=("exp_avg", "exp_avg_sq"))
    assert uc.state["step"] == fresh.state["step"] and uc.state["groups"] == fresh.state["groups"]
    _same(ds.state, full.state)  # DeepSpeed's difference: it loaded the moments anyway
    assert uc.state["global_steps"] == ds.state["global_steps"] == 3
    assert uc.state["lr_scheduler"] == ds.state["lr_scheduler"]
    assert uc.losses[0] == ds.losses[0] and uc.losses[1] != ds.losses[1]
    assert _client_keys(uc) == _client_keys(ds)
    assert all(info["optimizer_states"] is False for info in uc.loads)
    assert uc.loads[0]["bytes_read"] < full.loads[0]["bytes_read"]


@pytest.mark.parametrize("variant,reference", [("uc-mod", "ds-mod"), ("hook-mod", "ds-mod"),
                                               ("uc-z1-mod", "ds-z1-mod")])
def test_module_only_load_restores_the_weights_only(dense, variant, reference):
    ours, theirs, fresh = dense[variant], dense[reference], dense["fresh"]
    _same(ours.state, theirs.state, keys=("params",))
    _same(ours.state, fresh.state, keys=("exp_avg", "exp_avg_sq"))
    assert ours.state["step"] == fresh.state["step"]
    assert ours.state["global_steps"] == theirs.state["global_steps"] == 0
    assert ours.state["lr_scheduler"] == theirs.state["lr_scheduler"] == fresh.state["lr_scheduler"]
    assert ours.losses[0] == theirs.losses[0]
    assert _client_keys(ours) == _client_keys(theirs)
    assert {"global_steps", "dp_world_size"} <= _client_keys(ours)


def test_without_scheduler_states(dense):
    ours, full, fresh = dense["uc-nosched"], dense["uc"], dense["fresh"]
    _same(ours.state, full.state)
    assert ours.state["global_steps"] == 3 and ours.state["lr_scheduler"] == fresh.state["lr_scheduler"]
    assert "lr_scheduler" in _client_keys(ours) and "lr_scheduler" not in _client_keys(full)


def test_strict_refuses_missing_and_extra_parameters_and_lenient_names_them(dense):
    error = _error(dense["uc-strict"])
    assert "ValueError" in error["error_type"] and "InvalidCheckpointError" in error["error_type"]
    assert "blocks.1.weight" in error["error"] and "extra.weight" in error["error"]
    assert "load_module_strict=False" in error["error"]
    lenient, full, fresh = dense["uc-lenient"], dense["uc"], dense["fresh"]
    assert all(info["missing"] == ["blocks.1.weight"] and info["unexpected"] == ["extra.weight"]
               for info in lenient.loads)
    for name, value in lenient.state["params"].items():
        expected = fresh.state["params"][name] if name == "blocks.1.weight" else full.state["params"][name]
        assert torch.equal(value, expected), name
    for key in ("exp_avg", "exp_avg_sq"):
        assert not torch.any(lenient.state[key]["blocks.1.weight"])  # kept as a fresh optimizer holds it
        assert torch.equal(lenient.state[key]["blocks.0.weight"], full.state[key]["blocks.0.weight"])


def test_shape_mismatch_is_a_value_error(dense):
    error = _error(dense["uc-shape"])
    assert "ValueError" in error["error_type"]
    assert "embed.weight" in error["error"] and "[64, 48]" in error["error"]


def test_zero3_flags(store, tmp_path):
    """DeepSpeed's ZeRO-3 universal path honours load_module_only: every field equals, the next losses
    too. With load_optimizer_states=False DeepSpeed 0.19.8 fails: it looks for a native checkpoint's
    ``latest`` file (zero_to_fp32) in the Universal folder; uckpt loads the weights and counters. (With
    the default flags the second loss differs by design: at ZeRO-3 DeepSpeed gives every param group
    group 0's hyperparameters, uckpt keeps each group's own; see test_load.py.)"""
    name = "z3-bf16-dp2"
    universal = store.uckpt_universal(name, 2)
    stripped = _weights_only_copy(universal, str(tmp_path / "stripped"))
    variants = [{"name": "ds", "loader": "deepspeed"}, {"name": "uc", "loader": "uckpt"},
                {"name": "ds-noopt", "loader": "deepspeed", "load_optimizer_states": False, "expect_error": True},
                {"name": "uc-noopt", "loader": "uckpt", "load_optimizer_states": False, "load_dir": stripped},
                {"name": "ds-mod", "loader": "deepspeed", "load_module_only": True},
                {"name": "uc-mod", "loader": "uckpt", "load_module_only": True, "load_dir": stripped},
                {"name": "fresh", "load_dir": None}]
    runs = store.load_variants(name, os.path.dirname(universal), 3, CKPTS[name].args, variants)
    for ours, theirs in (("uc", "ds"), ("uc-mod", "ds-mod")):
        a, b = runs[ours], runs[theirs]
        _same(a.state, b.state)
        assert a.state["step"] == b.state["step"] and a.state["global_steps"] == b.state["global_steps"]
        assert a.losses[0] == b.losses[0] and _client_keys(a) == _client_keys(b), ours
    assert runs["uc-mod"].losses == runs["ds-mod"].losses
    assert "Unable to find 'latest' file" in _error(runs["ds-noopt"])["error"]
    weights = runs["uc-noopt"]
    _same(weights.state, runs["ds-mod"].state, keys=("params",))
    _same(weights.state, runs["fresh"].state, keys=("exp_avg", "exp_avg_sq"))
    assert weights.state["step"] == runs["fresh"].state["step"]
    assert weights.state["global_steps"] == 3 and runs["uc-mod"].state["global_steps"] == 0


def test_autotp_flags(store, tmp_path):
    name = "tp2-dp2-z2-bf16"
    universal, _ = store.universal_pair(name, 2)
    stripped = _weights_only_copy(universal, str(tmp_path / "stripped"))
    variants = _weights_only_pairs(stripped, ours_module_only="hook")
    args = ("--tp", "2", "--zero-stage", "2", "--dtype", "bf16")
    runs = store.load_variants(name, os.path.dirname(universal), 2, args, variants)
    _assert_weights_only_pairs(runs)
    assert runs["uc-noopt"].state["global_steps"] == 2 and runs["uc-mod"].state["global_steps"] == 0


@pytest.mark.parametrize("name,stage", [("ep2-dp2-z2-bf16", "2"), ("ep2-dp2-z3-bf16", "3")])
def test_autoep_flags_and_expert_count_mismatch(store, tmp_path, name, stage):
    """Weights-only loads of a tiny Mixtral at autoep_size 2 (ZeRO-2, and partition-native ZeRO-3). A target
    with 16 experts fails on the expert count, a ValueError naming both local counts as DeepSpeed's
    message does, before the router (whose shape differs too) is checked. DeepSpeed 0.19.8 itself checks
    the router first at ZeRO-2 and fails there with an AssertionError on its moments' sizes."""
    universal, _ = store.universal_pair(name, 2)
    stripped = _weights_only_copy(universal, str(tmp_path / "stripped"))
    variants = _weights_only_pairs(stripped) + [
        {"name": "ds-16", "loader": "deepspeed", "experts": 16, "expect_error": True},
        {"name": "uc-16", "loader": "uckpt", "experts": 16, "expect_error": True}]
    args = ("--ep", "2", "--zero-stage", stage, "--dtype", "bf16")
    runs = store.load_variants(name, os.path.dirname(universal), 2, args, variants)
    _assert_weights_only_pairs(runs)
    ours = _error(runs["uc-16"])
    assert "ValueError" in ours["error_type"] and "experts" in ours["error"]
    assert "target_local_experts=8, checkpoint_local_experts=4" in ours["error"]
    theirs = _error(runs["ds-16"])
    if stage == "2":
        assert theirs["error_type"][0] == "AssertionError" and "router" in theirs["error"]
