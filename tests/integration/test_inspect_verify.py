"""uckpt inspect / verify on real checkpoints, and on real files edited to be wrong."""
import json
import os
import shutil

import torch

from uckpt.tools import cli


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_inspect_native(store, capsys):
    rc, out, _ = _run(capsys, "inspect", store.save_dir("z2-bf16-dp4"), "--json")
    info = json.loads(out)
    assert rc == 0
    assert (info["kind"], info["zero_stage"], info["dp"], info["tp"], info["pp"], info["dtype"]) == \
        ("deepspeed", 2, 4, 1, 1, "bf16")
    assert info["params"] == 7 and info["convertible"] is True and "--inject_missing_state" in info["needs"]
    assert "global_step3" in info["note"]
    rc, out, _ = _run(capsys, "inspect", store.tag("pp2-dp1"), "--json")
    info = json.loads(out)
    layer_files = [f for f in os.listdir(store.tag("pp2-dp1")) if f.startswith("layer_") and "-model" in f]
    assert len(layer_files) > 0
    assert rc == 0 and (info["pp"], info["dp"], info["pipeline_layer_files"], info["convertible"]) == \
        (2, 1, len(layer_files), True)
    rc, out, _ = _run(capsys, "inspect", store.tag("pp2-dp1"))
    assert rc == 0 and out.splitlines()[0].split() == ["kind", "deepspeed"]


def test_inspect_universal(store, capsys):
    rc, out, _ = _run(capsys, "inspect", store.uckpt_universal("z3-bf16-dp2", 1), "--json")
    info = json.loads(out)
    assert rc == 0 and info["kind"] == "universal" and info["family"] == "zero3" and info["zero_stage"] == 3
    assert info["params"] > 0 and set(info["bytes_per_state"]) == {"fp32", "exp_avg", "exp_avg_sq"}


def test_inspect_says_why_not_convertible(copy_tag, capsys):
    tag = copy_tag("z2-fp32-dp3")
    model = os.path.join(tag, "mp_rank_00_model_states.pt")
    sd = torch.load(model, weights_only=False)
    sd["universal_checkpoint_info"] = {"universal_checkpoint_version": 0.4,
                                       "autotp_unsupported_parameter_patterns": {"^blocks": "Yuan shared QK"}}
    torch.save(sd, model)
    rc, out, _ = _run(capsys, "inspect", tag, "--json")
    info = json.loads(out)
    assert rc == 0 and info["convertible"] is False
    assert "AutoTP universal checkpoint conversion is not supported for ^blocks: Yuan shared QK" in info["why"]


def test_inspect_not_a_checkpoint(tmp_path, capsys):
    rc, _, err = _run(capsys, "inspect", str(tmp_path))
    assert rc == 2 and "is not a DeepSpeed checkpoint folder" in err


def test_verify_against_source_ours_and_deepspeeds(store, capsys):
    for name in ("z2-bf16-dp4", "z3-fp32-dp3", "pp2-dp1", "tp2-dp2-z2-bf16"):
        pair = store.universal_pair(name, 1) if name.startswith("tp") else (store.uckpt_universal(name, 1),
                                                                              store.ds_universal(name))
        for universal in pair:
            rc, out, _ = _run(capsys, "verify", universal, "--against", store.tag(name))
            assert rc == 0, out
            assert out.startswith("OK:") and "tensors compared with" in out


def test_verify_from_a_config_file(store, tmp_path, capsys):
    universal = store.uckpt_universal("z2-bf16-dp4", 1)
    yaml = tmp_path / "verify.yaml"
    yaml.write_text(f"universal: {universal}\njson: true\n")
    rc, out, _ = _run(capsys, "verify", "--config", str(yaml), f"against={store.tag('z2-bf16-dp4')}")
    assert rc == 0 and '"ok": true' in out and '"against"' in out
    rc, _, err = _run(capsys, "verify", "--config", str(yaml), "againts=x")
    assert rc == 2 and "did you mean 'against'" in err


def test_verify_finds_a_changed_value(store, tmp_path, capsys):
    bad = tmp_path / "universal"
    shutil.copytree(store.uckpt_universal("z2-bf16-dp4", 1), bad)
    path = bad / "zero" / "blocks.1.weight" / "exp_avg.pt"
    payload = torch.load(path, weights_only=False)
    payload["param"][3, 5] += 1e-6
    torch.save(payload, path)
    rc, out, _ = _run(capsys, "verify", str(bad))
    assert rc == 0  # still well-formed on its own
    rc, out, _ = _run(capsys, "verify", str(bad), "--against", store.tag("z2-bf16-dp4"), "--json")
    report = json.loads(out)
    assert rc == 1 and not report["ok"]
    assert len(report["failures"]) == 1
    assert report["failures"][0].startswith("blocks.1.weight: exp_avg differs from the native shards (max abs diff")


def test_verify_finds_missing_and_malformed_states(store, tmp_path, capsys):
    bad = tmp_path / "universal"
    shutil.copytree(store.uckpt_universal("z2-bf16-dp4", 1), bad)
    os.remove(bad / "zero" / "norm.bias" / "exp_avg_sq.pt")
    payload = torch.load(bad / "zero" / "norm.weight" / "exp_avg_sq.pt", weights_only=False)
    payload["param"][0] = -1.0
    torch.save(payload, bad / "zero" / "norm.weight" / "exp_avg_sq.pt")
    torch.save(torch.tensor(7.0), bad / "zero" / "blocks.0.bias" / "step.pt")
    rc, out, _ = _run(capsys, "verify", str(bad))
    assert rc == 1
    assert "norm.bias: has exp_avg but not all of exp_avg, exp_avg_sq" in out
    assert "norm.weight: exp_avg_sq has negative values" in out
    assert "step differs across parameters: [3.0, 7.0]" in out


def test_verify_not_universal(store, capsys):
    rc, _, err = _run(capsys, "verify", store.tag("z2-bf16-dp4"))
    assert rc == 2 and "is not a Universal checkpoint" in err
