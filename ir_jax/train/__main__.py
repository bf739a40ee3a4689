"""`python -m ir_jax.train --config configs/X.py [--config.a.b=value ...] --workdir DIR`.

Multi-host: every process (one per TPU VM worker, SLURM task or local test
process) runs the same command; see ir_jax/distributed.py for how the job is
detected, and launch/ for the TPU pod, SLURM and local launchers.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from absl import app, flags, logging
from ml_collections import config_flags

from ir_jax.errors import USER_ERRORS
from ir_jax.progress import Heartbeat, doing

if TYPE_CHECKING:
  from ir_jax.train.config import Settings

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file (configs/*.py) with sections model, data, train, routing, mesh. Override any "
  "field with --config.SECTION.FIELD=VALUE, e.g. --config.train.stages=forecaster "
  "--config.train.router.steps=500 --config.routing.policy=greedy "
  "--config.routing.sparsity=0.7 --config.mesh.fsdp=4 --config.data.batch_size=16.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Run directory for checkpoints, metrics.jsonl, tensorboard/ and eval.json. Rerunning the "
  "same command resumes from the newest checkpoint; SIGTERM saves one before exiting.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator",
  None,
  "HOST:PORT of process 0 for a multi-process run (with --num_processes and --process_id). "
  "Not needed on Cloud TPU VMs or under SLURM, where JAX finds the job itself.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "processes in a multi-process run (with --coordinator)"
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "this process's index in [0, --num_processes)"
)
flags.mark_flags_as_required(["config", "workdir"])

PROG = "ir_jax.train"
HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort", "-?")  # as ir_jax.absl_cli's
# "  ... WHAT (Ns so far)" whenever the output has been quiet for 8 s (ir_jax.progress)
_HEARTBEAT = Heartbeat()
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped after a checkpoint; rerun to resume


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing: --help exits 0 (with --config FILE: every field); one-line errors.

  A --workdir that cannot be a directory is refused first, before the config file
  imports JAX (seconds); a heartbeat starts here too, so that no stretch of the run,
  the imports included, is silent for long."""
  if not any(a in HELP_FLAGS for a in argv[1:]):
    problem = workdir_problem(_flag_value(argv, "workdir"))
    if problem:
      print(f"{PROG}: error: {problem}", file=sys.stderr)
      sys.exit(2)
    _HEARTBEAT.start()
  with doing("importing JAX and reading the config"):
    from ir_jax import absl_cli  # imports JAX (through ir_jax.config)

    return absl_cli.parse_flags(argv, PROG, __doc__)


def _flag_value(argv: list[str], name: str) -> str | None:
  """The last value of `--name` in argv (`--name=V` or `--name V`), as absl takes it."""
  value = None
  for i, a in enumerate(argv[1:], 1):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def workdir_problem(path: str | None) -> str | None:
  """Why `path` cannot be (or become) a run directory, in one line; None when it can.

  Checked with the standard library alone: an existing non-directory, a file among
  its parents, or a first existing parent that is not writable. Remote paths are left
  to the later check that names the route that works."""
  if not path or "://" in path:
    return None
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(full) and not os.path.isdir(full):
    return f"--workdir {path}: exists and is not a directory; give a directory"
  parent = full
  while not os.path.exists(parent):
    up = os.path.dirname(parent)
    if up == parent:
      return None
    parent = up
  if not os.path.isdir(parent):
    return (
      f"--workdir {path}: {parent} is a file, so no directory can be made under it; "
      "choose a workdir under a directory"
    )
  if parent != full and not os.access(parent, os.W_OK | os.X_OK):
    return f"--workdir {path}: cannot create it, {parent} is not writable"
  return None


def main(argv: list[str]) -> None:
  try:
    _main(argv)
  finally:
    _HEARTBEAT.stop()


def _main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.* flag")
  from ir_jax.config import refuse_remote
  from ir_jax.train import Preempted, TrainingError, run, settings_from_config

  cfg = _CONFIG.value
  try:
    cfg.keys()  # a file that failed to load raises here
  except OSError as e:  # the config file is missing or does not import
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"{PROG}: error: cannot load --config: {lines[-1] if lines else e}", file=sys.stderr)
    sys.exit(2)
  try:
    refuse_remote("--workdir", _WORKDIR.value)
    for section, field in (("model", "checkpoint"), ("train", "init_from")):
      if section in cfg and field in cfg[section]:
        refuse_remote(f"{section}.{field}", cfg[section][field])
    settings = settings_from_config(cfg)
    _start_processes(settings)
    run(settings, _WORKDIR.value)
  except USER_ERRORS as e:
    print(
      f"{PROG}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr
    )
    sys.exit(2)
  except TrainingError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    sys.exit(1)
  except Preempted as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)


def _start_processes(settings: Settings) -> None:
  """Joins a multi-process job (before any device is touched); then process 0
  prepares a missing local dataset while the others wait, so that processes
  sharing a filesystem do not write it concurrently."""
  import jax

  from ir_jax.distributed import maybe_initialize

  try:
    plan = maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except RuntimeError as e:  # the coordinator is unreachable, a peer died, ...
    print(
      f"{PROG}: error: cannot join the multi-process job: {str(e).splitlines()[0]}", file=sys.stderr
    )
    sys.exit(1)
  if not plan.distributed or jax.process_count() == 1:
    return
  if jax.process_index() != 0:  # process 0 speaks for the job
    _HEARTBEAT.stop()
  print(
    f"{PROG}: process {jax.process_index()} of {jax.process_count()} ({plan.reason}), "
    f"{jax.local_device_count()} local / {jax.device_count()} global devices",
    flush=True,
  )
  from jax.experimental import multihost_utils

  from ir_jax.data.builder import open_split

  if jax.process_index() == 0:
    open_split(settings.data, settings.data.train_split, prepare_if_missing=True)
  multihost_utils.sync_global_devices("ir_jax.train.data_prepared")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
