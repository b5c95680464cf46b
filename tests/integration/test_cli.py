"""Command line: ds_to_universal-compatible flags, latest_universal placement, dry run / plan,
config files and overrides, JSON report, quiet mode."""
import json
import os


from uckpt.tools import cli
from uckpt.tools.compare import compare_universal


def test_trailing_slash_and_compat_flags(store, tmp_path, capsys):
    out = tmp_path / "ckpts" / "step3_universal"
    rc = cli.main(["convert", "--input_folder", store.tag("z2-fp32-dp3") + "/", "--output_folder", str(out) + "/",
                   "--inject_missing_state", "--no_strict", "--keep_temp_folder", "--num_extract_workers", "8",
                   "--num_merge_workers", "3"])
    assert rc == 0
    assert (tmp_path / "ckpts" / "latest_universal").read_text() == "step3_universal"
    assert compare_universal(str(out), store.ds_universal("z2-fp32-dp3")) == []
    err = capsys.readouterr().err
    assert "[uckpt]" in err and "done in" in err


def test_quiet_and_json_report(store, tmp_path, capsys):
    out, rep = tmp_path / "u", tmp_path / "report.json"
    rc = cli.main(["convert", "--input_folder", store.tag("z3-bf16-dp2"), "--output_folder", str(out), "--quiet",
                   "--json", str(rep), "io.threads=2"])
    assert rc == 0
    assert capsys.readouterr().err == ""
    report = json.loads(rep.read_text())
    assert report == json.loads((out / "uckpt_report.json").read_text())
    assert report["config"]["io"]["threads"] == 2
    assert report["checkpoint"]["zero_stage"] == 3 and report["checkpoint"]["dp"] == 2
    assert report["ranks"][0]["written_bytes"] > 0 and report["ranks"][0]["peak_rss_mib"] > 0
    assert {"discover", "read_metadata", "plan", "merge_write", "total"} <= set(report["timings_s"])


def test_plan_and_dry_run_write_nothing(store, tmp_path, capsys):
    out = tmp_path / "u"
    for command in (["plan"], ["convert", "--dry-run"]):
        rc = cli.main([*command, "--input_folder", store.tag("z2-bf16-dp4"), "--output_folder", str(out),
                       "--inject_missing_state"])
        assert rc == 0
        printed = capsys.readouterr().out
        assert "ZeRO stage 2, dp=4" in printed and "7 parameters" in printed and "wave" in printed
        assert not out.exists()


def test_python_api_in_process(store, tmp_path):
    import uckpt

    out = tmp_path / "api" / "universal"
    report = uckpt.convert(store.tag("z2-bf16-dp4"), str(out), inject_missing_state=True,
                           memory={"budget_mb": 0}, log={"quiet": True})
    assert report["plan"]["waves"] > 1 and report["backend"] == "none"
    skip = lambda rel: rel == os.path.join("zero", "head.weight", "fp32.pt")  # noqa: E731
    assert compare_universal(str(out), store.ds_universal("z2-bf16-dp4"), skip=skip) == []


def test_python_api_on_an_existing_process_group(store, tmp_path):
    from examples import runner

    out, info = tmp_path / "pg" / "universal", tmp_path / "info.json"
    job = os.path.join(os.path.dirname(__file__), "jobs", "api_in_process_group.py")
    runner.run(runner.torchrun_cmd(2, [job, store.tag("z2-bf16-dp4"), str(out), str(info)]), timeout=300)
    assert json.loads(info.read_text()) == {"world": 2, "ranks": 2, "backend": "gloo"}
    skip = lambda rel: rel == os.path.join("zero", "head.weight", "fp32.pt")  # noqa: E731
    assert compare_universal(str(out), store.ds_universal("z2-bf16-dp4"), skip=skip) == []
