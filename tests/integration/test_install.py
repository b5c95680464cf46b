"""Installing uckpt into an environment that already has its torch keeps that torch: the package
declares ranges (pyproject.toml), the exact pins live in constraints.txt for set-up and CI only."""
import json
import os
import subprocess
import sys

from examples import runner


def _pip(venv, *args, timeout=900):
    return subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", *args], capture_output=True, text=True,
                          timeout=timeout, check=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))


def test_install_keeps_the_environments_torch(tmp_path):
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    _pip(venv, "install", "--quiet", "torch==2.13.0")  # the training environment's torch (from this disk)
    before = _pip(venv, "freeze").stdout.splitlines()
    torch_line = [line for line in before if line.lower().startswith("torch==")]
    report = tmp_path / "report.json"
    _pip(venv, "install", "--quiet", "--report", str(report), runner.REPO)
    after = _pip(venv, "freeze").stdout.splitlines()
    installed = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "uckpt" in installed and "deepspeed" in installed
    assert "torch" not in installed  # neither upgraded nor reinstalled
    assert torch_line and [line for line in after if line.lower().startswith("torch==")] == torch_line
    check = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import uckpt, torch; print(torch.__version__)"],
                           capture_output=True, text=True, check=True)
    assert check.stdout.strip() == torch_line[0].split("==")[1]
