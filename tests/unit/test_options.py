"""Options: YAML files, dotted overrides and flags resolve into the typed schemas, with closest-key errors."""
import os

import pytest

from uckpt.tools import cli
from uckpt import options as config
from uckpt.errors import UckptError


def test_config_file_overrides_and_flags(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("input_folder: a\noutput_folder: b\nio:\n  threads: 3\nmemory:\n  budget_mb: 100\n")
    cfg = config.build(str(yaml), ["memory.budget_mb=200"], {"io": {"threads": 7}})
    assert (cfg.input_folder, cfg.io.threads, cfg.memory.budget_mb) == ("a", 7, 200)


@pytest.mark.parametrize("override,hint", [("io.thread=2", "io.threads"), ("memory.budget=5", "memory.budget_mb"),
                                           ("overwrit=true", "overwrite")])
def test_unknown_key_names_the_closest(override, hint):
    with pytest.raises(UckptError, match=f"unknown setting .* did you mean '{hint}'"):
        config.build(None, [override], {"input_folder": "a", "output_folder": "b"})


def test_bad_value_and_missing_required():
    with pytest.raises(UckptError, match="bad value"):
        config.build(None, ["io.threads=many"], {"input_folder": "a", "output_folder": "b"})
    with pytest.raises(UckptError, match="output_folder is required"):
        config.build(None, [], {"input_folder": "a"})


def test_shipped_configs_are_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    for name in os.listdir(root):
        if name == "load.yaml":
            assert config.build(os.path.join(root, name), schema=config.LoadConfig).module_extras is True
            continue
        cfg = config.build(os.path.join(root, name), [], {"input_folder": "a", "output_folder": "b"})
        assert cfg.memory.budget_mb > 0


def test_load_and_verify_schemas():
    cfg = config.build(None, ["tag=global_step7"], {"module_extras": False}, schema=config.LoadConfig)
    assert cfg.tag == "global_step7" and cfg.module_extras is False and cfg.load_lr_scheduler_states is True
    with pytest.raises(UckptError, match="did you mean 'module_extras'"):
        config.build(None, [], {"module_extra": False}, schema=config.LoadConfig)
    with pytest.raises(UckptError, match="universal is required"):
        config.build(None, ["against=x"], schema=config.VerifyConfig)


def test_print_config_shows_the_resolved_settings(tmp_path, capsys):
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    rc = cli.main(["plan", "--config", os.path.join(root, "multinode.yaml"), "--input_folder", str(tmp_path / "nope"),
                   "--output_folder", str(tmp_path / "o"), "--print-config", "memory.budget_mb=123", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 2  # the input does not exist, but the resolved config was printed first
    assert "budget_mb: 123" in out and "timeout_s: 1800" in out and "threads: 8" in out


def test_deepspeed_version_outside_the_verified_range_warns_once_and_old_ones_are_refused():
    from uckpt.dsformat import compat

    assert compat.check_deepspeed("0.19.8") is None and compat.check_deepspeed("0.19.12+abc") is None
    with pytest.warns(RuntimeWarning, match=r"DeepSpeed 0\.21\.0 is installed.*verified against DeepSpeed 0\.19\.8"):
        assert "0.21.0" in compat.check_deepspeed("0.21.0")
    with pytest.raises(UckptError, match="DeepSpeed 0.9.5 is installed"):
        compat.check_deepspeed("0.9.5")
    assert compat.check_deepspeed(compat.installed()) is None  # the pinned one
