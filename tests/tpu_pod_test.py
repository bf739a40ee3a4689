"""launch/tpu_pod.sh beyond tests/launchers_test.py: queued resources, the worker install
(Python from uv, gcsfuse from Google's apt repository, extra gcsfuse flags), the job
detached from ssh (run here, for real, with a stand-in python), shellcheck, and
pyproject's requires-python against the pinned jax.

What is checked against what:
  queued     the printed gcloud lines against the environment given (QUEUED=1, SPOT=1)
  install    the worker script's lines against the documented install route
  detached   the printed worker training script is run here (HOME in a temporary
             directory, a fake ~/venv/bin/python recording its argv and exiting 143):
             the job survives its follower being killed (a dropped ssh), a second
             follower attaches to it instead of starting another, both end with the
             job's status, and the log lands in the bucket directory
  shellcheck the launchers and the worker scripts they print (skipped without shellcheck)
  python     requires-python in pyproject.toml equals what the installed jax declares
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import subprocess
import time

import pytest
from launchers_test import BASH, SLURM, TPU, TPU_ENV, _commands, _dry_run

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _remote(cmd: list[str]) -> str:
  return next(a for a in cmd if a.startswith("--command=")).removeprefix("--command=")


def test_queued_resources_route(tmp_path):
  env = {**TPU_ENV, "QUEUED": "1"}
  out = _dry_run(TPU, ["--config", "configs/llama7b.py"], env, tmp_path)
  assert out.returncode == 0, out.stderr
  cmds = _commands(out.stdout)
  qr = [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "--project=my-project",
    "--zone=us-west4-a",
  ]
  verbs = [c[6] if c[0] == "gcloud" else c[0] for c in cmds]
  assert verbs == ["describe", "create", "tar", "scp", "rm", "ssh", "ssh", "delete"], verbs
  assert cmds[0][:6] == qr and cmds[0][7:] == ["ir-v5e16", "--format=value(state.state)"]
  assert cmds[1] == [
    *qr,
    "create",
    "ir-v5e16",
    "--node-id=ir-v5e16",
    "--accelerator-type=v5litepod-16",
    "--runtime-version=v2-alpha-tpuv5-lite",
    "--spot",
  ]
  assert "polls the describe line above every 60 s until the state is ACTIVE" in out.stdout
  assert cmds[-1] == [*qr, "delete", "ir-v5e16", "--force", "--quiet"]
  # The workers are still reached as TPU VMs (the node id is NAME).
  assert all(c[3] == "tpu-vm" for c in cmds if c[0] == "gcloud" and c[6] in ("scp", "ssh"))

  for bad in ("QUEUED", "SPOT", "LOG_EVERY"):
    wrong = _dry_run(TPU, ["--config", "c"], {**env, bad: "yes"}, tmp_path)
    assert wrong.returncode == 2 and f"{bad} must be" in wrong.stderr, wrong.stderr


def test_worker_install_python_and_gcsfuse(tmp_path):
  env = {**TPU_ENV, "GCSFUSE_FLAGS": "--rename-dir-limit=200000"}
  out = _dry_run(TPU, ["--config", "configs/llama7b.py"], env, tmp_path)
  assert out.returncode == 0, out.stderr
  install, _ = [c for c in _commands(out.stdout) if c[0] == "gcloud" and c[6] == "ssh"]
  script = _remote(install)
  lines = [l.strip() for l in script.splitlines()]
  assert "test -x ~/.local/bin/uv || python3 -m pip install -q --user 'uv==0.13.8'" in lines
  assert "rm -rf ~/venv && ~/.local/bin/uv venv -q --seed --python 3.11 ~/venv" in lines
  assert "~/venv/bin/pip install -q -e ~/ir_jax 'jax[tpu]==0.10.2'" in lines
  assert "| sudo gpg --dearmor --yes -o /usr/share/keyrings/cloud.google.gpg" in lines
  assert (
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] '
    'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" \\' in lines
  )
  assert (
    "mkdir -p $HOME/gcs && gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket $HOME/gcs"
    in lines
  )
  # The checkout is not replaced under a running job.
  assert lines[1].startswith("if test -f $HOME/ir_jax_job.pid") and lines[1].endswith("exit 0; fi")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean(tmp_path):
  out = subprocess.run(
    ["shellcheck", TPU, SLURM], capture_output=True, text=True, timeout=60, check=False
  )
  assert out.returncode == 0, out.stdout
  dry = _dry_run(TPU, ["--config", "configs/llama7b.py"], TPU_ENV, tmp_path)
  for i, cmd in enumerate(c for c in _commands(dry.stdout) if c[0] == "gcloud" and c[6] == "ssh"):
    path = tmp_path / f"worker{i}.sh"
    path.write_text("#!/usr/bin/env bash\n" + _remote(cmd) + "\n")
    # Warnings and errors: the info-level SC2086 would quote every $HOME (a path without
    # spaces on a TPU VM), and SC2088 flags '~' in the quoted heredocs, meant literally.
    out = subprocess.run(
      ["shellcheck", "-S", "warning", "-e", "SC2088", str(path)],
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
    )
    assert out.returncode == 0, out.stdout


def _worker(tmp_path):
  """A fake worker home: the checkout, the bucket mount's run directory, a venv whose
  python records its argv, prints a line, waits for a release file, exits 143."""
  home = tmp_path / "home"
  (home / "ir_jax").mkdir(parents=True)
  (home / "gcs" / "runs" / "ir-v5e16" / "logs").mkdir(parents=True)
  (home / "venv" / "bin").mkdir(parents=True)
  py = home / "venv" / "bin" / "python"
  py.write_text(
    "#!/usr/bin/env bash\n"
    'printf "%s\\n" "$@" > "$HOME/argv"\n'
    'echo run >> "$HOME/runs"\n'
    'echo "trainer started in $PWD"\n'
    'while [ ! -f "$HOME/release" ]; do sleep 0.2; done\n'
    "exit 143\n"
  )
  py.chmod(0o755)
  return home


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
  end = time.time() + timeout
  while not predicate():
    assert time.time() < end, f"timed out waiting for {what}"
    time.sleep(0.1)


def _follow_twice(home, follow) -> None:
  """Start the job, drop its follower, follow it again, release it: status 143 (as the
  stand-in trainer exits) comes back through the second follower."""
  first = follow()
  _wait_for(lambda: (home / "argv").exists(), "the trainer to start")
  os.killpg(first.pid, signal.SIGHUP)  # the ssh session drops: its shell and tail go
  first.wait(timeout=30)
  pid = int((home / "ir_jax_job.pid").read_text())
  os.kill(pid, 0)  # the job lives on

  second = follow()
  _wait_for(lambda: (home / "ir_jax_job.log").read_text().count("trainer started") == 1, "log")
  time.sleep(0.5)
  (home / "release").touch()
  out, _ = second.communicate(timeout=60)
  assert second.returncode == 143, out
  assert "following the running job (pid " in out and "trainer started in" in out, out


def test_the_job_runs_detached_and_is_followed_again(tmp_path):
  dry = _dry_run(TPU, ["--config", "configs/llama7b.py"], {**TPU_ENV, "LOG_EVERY": "1"}, tmp_path)
  assert dry.returncode == 0, dry.stderr
  train = _remote([c for c in _commands(dry.stdout) if c[0] == "gcloud" and c[6] == "ssh"][1])
  home = _worker(tmp_path)
  env = {"PATH": os.environ["PATH"], "HOME": str(home), "LC_ALL": "C"}

  def follow() -> subprocess.Popen:
    return subprocess.Popen(
      [BASH, "-c", train],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )

  try:
    _follow_twice(home, follow)
  finally:
    (home / "release").touch()  # no stand-in trainer outlives the test
  assert (home / "runs").read_text() == "run\n"  # one trainer, not two
  assert (home / "argv").read_text().splitlines() == [
    "-m",
    "ir_jax.train",
    "--config",
    "configs/llama7b.py",
    f"--workdir={home}/gcs/runs/ir-v5e16",
    f"--config.data.data_dir={home}/gcs/tfds",
  ]
  host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
  bucket_log = home / "gcs" / "runs" / "ir-v5e16" / "logs" / f"{host}.log"
  assert f"trainer started in {home}/ir_jax" in bucket_log.read_text()
  assert (home / "ir_jax_job.status").read_text() == "143\n"


def test_requires_python_is_what_the_pinned_jax_requires():
  import tomllib

  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  pins = {d.split("==")[0]: d.split("==")[1] for d in project["dependencies"] if "==" in d}
  assert importlib.metadata.version("jax") == pins["jax"]
  needed = {importlib.metadata.metadata(p)["Requires-Python"] for p in ("jax", "jaxlib", "flax")}
  assert needed == {">=3.11"}
  assert project["requires-python"] == ">=3.11"
