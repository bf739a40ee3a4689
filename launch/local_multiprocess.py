"""Run N local processes of one `python -m ir_jax.train` command as a multi-process job.

Exercises the multi-host code paths (jax.distributed with a coordinator on
127.0.0.1, per-process data shards, process-0-only logs, cooperative orbax
checkpoints) on one machine, on CPU with gloo collectives:

  python launch/local_multiprocess.py --num_processes 2 --devices_per_process 1 -- \\
      --config configs/tiny.py --workdir runs/tiny_mp --config.mesh.data=-1

Everything after `--` is passed to every process; the launcher adds
--coordinator 127.0.0.1:PORT --num_processes N --process_id I and sets
JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D.
Output lines are prefixed `[pI]`. If one process fails the others are
stopped; the exit status is the first non-zero one (0 when all succeed).
Rerunning the same command resumes, as a single-process run does.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(
  proc: subprocess.Popen,
  prefix: str,
  out: Any,
  on_line: Callable[[str, list[subprocess.Popen]], None] | None,
  procs: list[subprocess.Popen],
) -> None:
  for line in proc.stdout:  # type: ignore[union-attr]
    out.write(f"{prefix} {line}")
    out.flush()
    if on_line is not None:
      on_line(f"{prefix} {line}", procs)


def launch(
  args: list[str],
  num_processes: int,
  devices_per_process: int = 1,
  module: str = "ir_jax.train",
  port: int = 0,
  cwd: str | None = None,
  timeout: float | None = None,
  out: Any = None,
  on_line: Callable[[str, list[subprocess.Popen]], None] | None = None,
) -> int:
  """Runs the processes to completion; returns the job's exit status.

  `on_line(line, processes)` sees every output line (prefixed `[pI] `) as it arrives,
  with the job's processes (e.g. to signal one of them at a chosen moment).
  """
  out = out or sys.stdout
  port = port or free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
  )
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(var, None)
  procs, pumps = [], []
  for i in range(num_processes):
    cmd = [
      sys.executable,
      "-u",
      "-m",
      module,
      *args,
      f"--coordinator=127.0.0.1:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={i}",
    ]
    p = subprocess.Popen(
      cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p, f"[p{i}]", out, on_line, procs), daemon=True)
    t.start()
    pumps.append(t)
  deadline = None if timeout is None else time.time() + timeout
  status = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed or (deadline is not None and time.time() > deadline):
        status = failed[0] if failed else 124
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    status = 130
  if status:  # a peer waiting in a collective would otherwise hang until its timeout
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  for t in pumps:
    t.join(timeout=5)
  return status or next((p.returncode for p in procs if p.returncode), 0)


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], usage="%(prog)s [options] -- TRAIN_ARGS ..."
  )
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=1, help="fake CPU devices per process")
  p.add_argument("--module", default="ir_jax.train", help="python -m MODULE to run")
  p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  p.add_argument("--timeout", type=float, default=None, help="seconds before stopping the job")
  p.add_argument("train_args", nargs=argparse.REMAINDER)
  a = p.parse_args()
  args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
  if a.num_processes < 1 or a.devices_per_process < 1:
    p.error("--num_processes and --devices_per_process must be >= 1")
  sys.exit(
    launch(args, a.num_processes, a.devices_per_process, a.module, a.port, timeout=a.timeout)
  )


if __name__ == "__main__":
  main()
