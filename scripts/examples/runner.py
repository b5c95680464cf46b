"""Launch real DeepSpeed jobs and DeepSpeed's own converter as subprocesses.

One place for the tests, the demo and the benchmark to start ``torchrun`` jobs on CPU
(``DS_ACCELERATOR=cpu``, gloo) and to run ``ds_to_universal.py`` for comparison.
"""
import os
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "scripts")  # holds this package (examples): trainers run as -m examples.<name>


class JobError(RuntimeError):
    def __init__(self, cmd: Sequence[str], rc: int, log: str):
        tail = "\n".join(line for line in log.splitlines() if "Warning" not in line and "warn(" not in line)[-3000:]
        super().__init__(f"command failed (exit {rc}): {' '.join(cmd)}\n{tail}")
        self.rc, self.log = rc, log


def env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    e = dict(os.environ)
    e.setdefault("DS_ACCELERATOR", "cpu")
    e["OMP_NUM_THREADS"] = e.get("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = os.pathsep.join([REPO, SCRIPTS] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, args: Sequence[str]) -> List[str]:
    """``torchrun`` on this machine alone; ``args`` start with ``-m module`` or a script path."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *args]


def run(cmd: Sequence[str], timeout: float = 600, check: bool = True, extra_env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=REPO, env=env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise JobError(cmd, proc.returncode, proc.stdout)
    return proc


def train(nproc: int, *args: str, module: str = "examples.tiny_train", timeout: float = 600):
    """Run an example trainer under torchrun with real DeepSpeed."""
    return run(torchrun_cmd(nproc, ["-m", module, *args]), timeout=timeout)


def cached_checkpoint(save_dir: str, nproc: int, args: Sequence[str], module: str, timeout: float = 3600) -> str:
    """The tag folder of a checkpoint ``module`` saves into ``save_dir`` with ``args`` under torchrun,
    trained once: a later call finds it by its ``latest`` file."""
    latest = os.path.join(save_dir, "latest")
    if not os.path.exists(latest):
        import shutil

        shutil.rmtree(save_dir, ignore_errors=True)  # an interrupted build
        print(f"training {os.path.basename(save_dir)} with DeepSpeed ...", flush=True)
        train(nproc, *args, "--save-dir", save_dir, module=module, timeout=timeout)
    with open(latest) as f:
        return os.path.join(save_dir, f.read().strip())


def ds_to_universal(input_folder: str, output_folder: str, *extra: str, timeout: float = 600):
    """DeepSpeed's own converter (deepspeed/checkpoint/ds_to_universal.py of the installed DeepSpeed)."""
    return run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", input_folder,
                "--output_folder", output_folder, *extra], timeout=timeout)


def uckpt_convert(nproc: int, input_folder: str, output_folder: str, *extra: str, timeout: float = 600,
               check: bool = True):
    """``python -m uckpt convert`` (one process) or ``torchrun -m uckpt convert`` (several)."""
    args = ["convert", "--input_folder", input_folder, "--output_folder", output_folder, *extra]
    cmd = [sys.executable, "-m", "uckpt", *args] if nproc == 1 else torchrun_cmd(nproc, ["-m", "uckpt", *args])
    return run(cmd, timeout=timeout, check=check)
