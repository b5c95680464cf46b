"""Launch scripts: one node (torchrun --standalone), two "nodes" on this machine rendezvousing on
127.0.0.1, and the SLURM script driven by stand-in srun / scontrol. Each output must equal the
single-process conversion of the same real checkpoint."""
import os
import stat
import subprocess

from uckpt.tools.compare import compare_universal
from examples import runner

LAUNCH = os.path.join(runner.REPO, "launch")


def _run(cmd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.env(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc


def test_single_node_launcher(store, tmp_path):
    out = tmp_path / "one" / "universal"
    proc = _run([os.path.join(LAUNCH, "convert.sh"), "2", "--input_folder", store.tag("z3-bf16-dp2"),
                 "--output_folder", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert compare_universal(str(out), store.uckpt_universal("z3-bf16-dp2", 1)) == []


def test_two_nodes_rendezvous_on_localhost(store, tmp_path):
    out = tmp_path / "multi" / "universal"
    port = runner.free_port()
    nodes = [subprocess.Popen([os.path.join(LAUNCH, "multinode.sh"), "--nnodes", "2", "--node_rank", str(rank),
                               "--rdzv_endpoint", f"127.0.0.1:{port}", "--nproc_per_node", "1",
                               "--input_folder", store.tag("z2-bf16-dp4"), "--output_folder", str(out),
                               "--inject_missing_state", "--quiet"],
                              cwd=runner.REPO, env=runner.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert compare_universal(str(out), store.uckpt_universal("z2-bf16-dp4", 1)) == []
    import json
    report = json.load(open(out / "uckpt_report.json"))
    assert report["plan"]["world_size"] == 2 and len(report["ranks"]) == 2


def test_multinode_launcher_names_what_is_missing():
    proc = _run([os.path.join(LAUNCH, "multinode.sh"), "--input_folder", "x", "--output_folder", "y"],
                env={"NNODES": "", "NODE_RANK": "", "RDZV_ENDPOINT": "", "MASTER_ADDR": ""})
    assert proc.returncode == 2
    assert "--nnodes" in proc.stdout and "--node_rank" in proc.stdout and "--rdzv_endpoint" in proc.stdout


def _stub(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_with_stand_in_srun(store, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # stand-ins for a 2-node allocation on this machine: the head node is localhost, and srun runs
    # the task once per node with SLURM_NODEID set, as SLURM does with --ntasks-per-node=1
    _stub(bin_dir / "scontrol", 'echo localhost\necho localhost\n')
    _stub(bin_dir / "srun", 'shift\npids=()\nfor ((i=0; i<SLURM_JOB_NUM_NODES; i++)); do\n'
                            '  SLURM_NODEID=$i "$@" & pids+=($!)\ndone\nrc=0\n'
                            'for p in "${pids[@]}"; do wait "$p" || rc=1; done\nexit $rc\n')
    out = tmp_path / "slurm" / "universal"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": runner.REPO,
           "MASTER_PORT": str(runner.free_port()), "NPROC_PER_NODE": "1"}
    proc = _run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--input_folder", store.tag("z3-bf16-dp2"),
                 "--output_folder", str(out), "--quiet"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert compare_universal(str(out), store.uckpt_universal("z3-bf16-dp2", 1)) == []
