"""The SLURM and Cloud TPU launchers: `bash -n`, and their dry runs with simulated environments.

What is checked against what:
  syntax     `bash -n` on launch/tpu_pod.sh and launch/slurm_gpu.sbatch
  TPU pod    the printed gcloud lines (describe, create with accelerator / runtime / spot /
             zone / project, scp and ssh --worker=all, delete at the end) and the training
             command each worker runs, against the env and arguments given
  SLURM      coordinator = first host of a fake SLURM_JOB_NODELIST, process count, per-task
             JAX_PROCESS_ID, one process per GPU or per node, the srun line
Neither gcloud, srun, scontrol nor nvidia-smi is needed: the scripts run with a PATH of
a few basic tools and only the environment each test gives. Fast (about a second).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
BASH = shutil.which("bash") or "/bin/bash"


def _bin_dir(tmp_path) -> str:
  """A PATH with the few tools the scripts use, and no gcloud, srun, scontrol or nvidia-smi."""
  d = tmp_path / "bin"
  if d.is_dir():
    return str(d)
  d.mkdir()
  for tool in ("bash", "seq", "head", "wc", "mkdir", "mktemp", "rm", "tar", "tee", "cat"):
    where = shutil.which(tool)
    if where:
      os.symlink(where, d / tool)
  return str(d)


def _dry_run(
  script: str, args: list[str], env: dict[str, str], tmp_path, flag: bool = True
) -> subprocess.CompletedProcess:
  """`bash SCRIPT [--dry-run] ARGS` in `tmp_path` with only `env` (and a basic PATH)."""
  base = {"PATH": _bin_dir(tmp_path), "HOME": str(tmp_path), "LC_ALL": "C"}
  cmd = [BASH, script, *(["--dry-run"] if flag else []), *args]
  return subprocess.run(
    cmd,
    cwd=str(tmp_path),
    env={**base, **env},
    capture_output=True,
    text=True,
    timeout=30,
    check=False,
  )


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands (lines starting '+ ', continued over quoted newlines), as argv."""
  out, current = [], None
  for line in stdout.splitlines(keepends=True):
    if current is None and line.startswith("+ "):
      current = line[2:]
    elif current is not None:
      current += line
    else:
      continue
    try:
      out.append(shlex.split(current))
      current = None
    except ValueError:  # a quoted argument continues on the next line
      pass
  assert current is None, f"unterminated command: {current!r}"
  return out


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_scripts_parse(script):
  out = subprocess.run(
    [BASH, "-n", script], capture_output=True, text=True, timeout=30, check=False
  )
  assert out.returncode == 0, out.stderr


# ------------------------------------------------------------ TPU pod
TPU_ENV = {
  "PROJECT": "my-project",
  "ZONE": "us-west4-a",
  "ACCEL": "v5litepod-16",
  "NAME": "ir-v5e16",
  "BUCKET": "my-bucket",
  "SPOT": "1",
  "DELETE_AT_END": "1",
}
TRAIN_ARGS = ["--config", "configs/llama7b.py", "--config.model.checkpoint=../gcs/ckpt/it's 7b"]


def test_tpu_pod_dry_run_prints_the_gcloud_commands_and_the_training_command(tmp_path):
  out = _dry_run(TPU, TRAIN_ARGS, TPU_ENV, tmp_path)
  assert out.returncode == 0, out.stderr
  cmds = _commands(out.stdout)
  gc = ["gcloud", "compute", "tpus", "tpu-vm", "--project=my-project", "--zone=us-west4-a"]
  assert all(c[:6] == gc for c in cmds if c[0] == "gcloud")
  verbs = [c[6] if c[0] == "gcloud" else c[0] for c in cmds]
  assert verbs == ["describe", "create", "tar", "scp", "rm", "ssh", "ssh", "delete"], verbs
  by_verb = {v: c for v, c in zip(verbs, cmds)}
  assert by_verb["create"][7:] == [
    "ir-v5e16",
    "--accelerator-type=v5litepod-16",
    "--version=v2-alpha-tpuv5-lite",
    "--spot",
  ]
  assert by_verb["scp"][-2:] == ["ir-v5e16:ir_jax.tar.gz", "--worker=all"]
  assert by_verb["delete"][7:] == ["ir-v5e16", "--quiet"]
  install, train = [c for c in cmds if c[:7] == [*gc, "ssh"]]
  for c in (install, train):
    assert c[7:9] == ["ir-v5e16", "--worker=all"]
  install_script = next(a for a in install if a.startswith("--command="))
  assert "gcsfuse --implicit-dirs my-bucket $HOME/gcs" in install_script
  assert "pip install -q -e ~/ir_jax 'jax[tpu]==0.10.2'" in install_script

  # The command the workers run, as the remote shell will split it.
  remote = next(a for a in train if a.startswith("--command=")).removeprefix("--command=")
  line = next(l for l in remote.splitlines() if "ir_jax.train" in l)
  argv = shlex.split(line[line.index("exec ") + len("exec ") :])
  assert argv == [
    "~/venv/bin/python",
    "-m",
    "ir_jax.train",
    *TRAIN_ARGS,
    "--workdir=$HOME/gcs/runs/ir-v5e16",
    "--config.data.data_dir=$HOME/gcs/tfds",
  ]
  assert "runs/tpu_pod_ir-v5e16.log" in out.stdout
  # A dry run leaves nothing behind (no runs/ directory, no tarball).
  assert sorted(os.listdir(tmp_path)) == ["bin"]


def test_tpu_pod_dry_run_by_environment_defaults_and_errors(tmp_path):
  env = {k: TPU_ENV[k] for k in ("PROJECT", "ZONE", "BUCKET")} | {"ACCEL": "v5p-16", "DRY_RUN": "1"}
  out = _dry_run(TPU, ["--config", "configs/tiny.py"], env, tmp_path, flag=False)
  assert out.returncode == 0, out.stderr
  cmds = _commands(out.stdout)
  create = next(c for c in cmds if "create" in c)
  assert create[7:] == ["ir-jax-v5p-16", "--accelerator-type=v5p-16", "--version=v2-alpha-tpuv5"]
  assert not any("delete" in c for c in cmds)  # neither DELETE_AT_END nor a preemption
  assert "--workdir=$HOME/gcs/runs/ir-jax-v5p-16" in out.stdout

  missing = _dry_run(TPU, ["--config", "configs/tiny.py"], {"ZONE": "z", "BUCKET": "b"}, tmp_path)
  assert missing.returncode != 0 and "PROJECT" in missing.stderr
  unknown = _dry_run(TPU, ["--config", "c"], {**env, "ACCEL": "v9-8"}, tmp_path)
  assert unknown.returncode == 2 and "set RUNTIME" in unknown.stderr
  no_args = _dry_run(TPU, [], env, tmp_path)
  assert no_args.returncode == 2 and "pass the ir_jax.train flags" in no_args.stderr
  # Without the dry run the missing gcloud is a one-line error, before anything happens.
  real = _dry_run(TPU, ["--config", "c"], {**env, "DRY_RUN": "0"}, tmp_path, flag=False)
  assert real.returncode == 2 and "gcloud not found" in real.stderr


# ------------------------------------------------------------ SLURM
def _slurm_env(**kw: str) -> dict[str, str]:
  env = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "node[01-03]",
    "SLURM_NTASKS": "24",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_SUBMIT_DIR": "/shared/ir_jax",
  }
  return {**env, **kw}


SLURM_ARGS = ["--config", "configs/llama7b.py", "--workdir", "/shared/runs/llama 7b"]


def test_slurm_dry_run_one_process_per_gpu(tmp_path):
  out = _dry_run(SLURM, SLURM_ARGS, _slurm_env(), tmp_path)
  assert out.returncode == 0, out.stderr
  assert "ir_jax on 3 node(s), 24 process(es) (one per gpu); coordinator node01:24242" in out.stdout
  cmds = _commands(out.stdout)
  assert cmds[0] == [
    "export",
    "JAX_COORDINATOR_ADDRESS=node01:24242",
    "JAX_NUM_PROCESSES=24",
    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
  ]
  assert ["unset", "JAX_LOCAL_DEVICE_IDS"] in cmds
  assert ["cd", "/shared/ir_jax"] in cmds
  srun = next(c for c in cmds if c[0] == "srun")
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "bash"]
  assert srun[3:5] == [
    "-c",
    'export JAX_PROCESS_ID="${SLURM_PROCID}"; exec "$0" -m ir_jax.train "$@"',
  ]
  assert srun[5:] == ["/shared/ir_jax/.venv/bin/python", *SLURM_ARGS]
  # What that bash -c line runs in task 5: a stand-in python prints its env and argv.
  fake = tmp_path / "python"
  fake.write_text('#!/bin/sh\necho "JAX_PROCESS_ID=$JAX_PROCESS_ID"\nprintf "%s\\n" "$@"\n')
  fake.chmod(0o755)
  task = subprocess.run(
    [BASH, *srun[3:5], str(fake), *srun[6:]],
    env={"SLURM_PROCID": "5"},
    capture_output=True,
    text=True,
    timeout=30,
    check=True,
  )
  assert task.stdout.splitlines() == ["JAX_PROCESS_ID=5", "-m", "ir_jax.train", *SLURM_ARGS]
  each = next(l for l in out.stdout.splitlines() if l.startswith("# each task"))
  assert each == (
    "# each task (SLURM_PROCID 0 .. 23) runs: JAX_PROCESS_ID=${SLURM_PROCID} "
    "/shared/ir_jax/.venv/bin/python -m ir_jax.train --config configs/llama7b.py "
    "--workdir '/shared/runs/llama 7b'"
  )
  assert sorted(os.listdir(tmp_path)) == ["bin", "python"]  # no runs/: nothing was run


def test_slurm_dry_run_one_process_per_node_and_other_settings(tmp_path):
  env = _slurm_env(
    PER="node",
    SLURM_NTASKS="3",
    SLURM_GPUS_ON_NODE="4",
    PORT="12345",
    VENV="/opt/venv",
    XLA_PYTHON_CLIENT_MEM_FRACTION="0.8",
  )
  out = _dry_run(SLURM, SLURM_ARGS, env, tmp_path)
  assert out.returncode == 0, out.stderr
  cmds = _commands(out.stdout)
  assert cmds[0] == [
    "export",
    "JAX_COORDINATOR_ADDRESS=node01:12345",
    "JAX_NUM_PROCESSES=3",
    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8",
    "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
  ]
  assert next(c for c in cmds if c[0] == "srun")[5] == "/opt/venv/bin/python"
  assert "(one per node)" in out.stdout
  # Without SLURM_GPUS_ON_NODE or nvidia-smi the dry run assumes 8 GPUs and says so.
  out = _dry_run(SLURM, SLURM_ARGS, _slurm_env(PER="node", DRY_RUN="1"), tmp_path, flag=False)
  assert out.returncode == 0, out.stderr
  assert "assuming 8 GPUs per node" in out.stdout
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in out.stdout


@pytest.mark.parametrize(
  "nodelist,head",
  [
    ("node[01-03]", "node01"),
    ("node07", "node07"),
    ("a1,a2", "a1"),
    ("gpu5,node[1-2]", "gpu5"),
    ("gpu-a[7,9-12],gpu-b1", "gpu-a7"),
    ("rack[2-3]-n[003-010]", "rack2-n003"),
  ],
)
def test_slurm_coordinator_is_the_first_host_of_the_node_list(tmp_path, nodelist, head):
  out = _dry_run(
    SLURM, ["--config", "c"], _slurm_env(SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID="7"), tmp_path
  )
  assert out.returncode == 0, out.stderr
  assert re.search(
    rf"^\+ export JAX_COORDINATOR_ADDRESS={re.escape(head)}:20007 ", out.stdout, re.MULTILINE
  ), out.stdout


def test_slurm_errors(tmp_path):
  no_job = _dry_run(SLURM, ["--config", "c"], {}, tmp_path)
  assert no_job.returncode != 0 and "SLURM_JOB_ID" in no_job.stderr
  bad_per = _dry_run(SLURM, ["--config", "c"], _slurm_env(PER="socket"), tmp_path)
  assert bad_per.returncode == 2 and "PER must be gpu or node" in bad_per.stderr
  no_args = _dry_run(SLURM, [], _slurm_env(), tmp_path)
  assert no_args.returncode == 2 and "pass the ir_jax.train flags" in no_args.stderr
  bad_flag = _dry_run(SLURM, ["--config", "c"], _slurm_env(DRY_RUN="yes"), tmp_path, flag=False)
  assert bad_flag.returncode == 2 and "DRY_RUN must be 0 or 1" in bad_flag.stderr
