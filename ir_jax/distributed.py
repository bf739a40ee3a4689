"""Multi-process start-up: decide from flags and the environment whether to call
`jax.distributed.initialize()`, before anything touches a device.

One process per host (TPU VM worker, SLURM node) or per GPU runs the same
command; afterwards `jax.devices()` lists every device of the job,
`jax.process_index()` says which process this is, and ir_jax.train writes
logs and run metadata from process 0 only, reads this process's data shard
and saves checkpoints cooperatively through orbax.

Decision, first match wins:
  1. explicit `coordinator` / `num_processes` / `process_id` (all three, or
     JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment);
  2. IR_JAX_DISTRIBUTED=0 turns the detection below off, =1 forces an
     auto-detected initialize();
  3. SLURM with more than one task (SLURM_JOB_ID and SLURM_NTASKS > 1): JAX reads
     the node list, SLURM_PROCID and SLURM_LOCALID itself (one GPU per process
     unless JAX_LOCAL_DEVICE_IDS lists more);
  4. a Cloud TPU VM (libtpu installed and a TPU device node present): JAX asks
     the TPU metadata server for the workers of the slice;
  otherwise a single process, and nothing is initialised.
On CPU-only runs (JAX_PLATFORMS=cpu) cross-process collectives use gloo.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from ir_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Plan:
  """How (and whether) this process joins a multi-process job."""

  reason: str  # "single", "flags", "env", "slurm", "tpu"
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def distributed(self) -> bool:
    return self.reason != "single"


def _int(value: str | None, what: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{what} must be an integer, got {value!r}") from None


def on_tpu_vm() -> bool:
  """A Cloud TPU VM: libtpu importable and a TPU device node (v2-v4: /dev/accel*, v5+: vfio)."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def plan(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  env: Mapping[str, str] | None = None,
  tpu_vm: bool | None = None,
) -> Plan:
  """Decides how to start (see the module docstring); raises ConfigError on half-given flags."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _int(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _int(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
  given = {
    "--coordinator": coordinator,
    "--num_processes": num_processes,
    "--process_id": process_id,
  }
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ConfigError(
        f"multi-process flags need all of --coordinator, --num_processes and "
        f"--process_id; missing {', '.join(missing)}"
      )
    if ":" not in coordinator:
      raise ConfigError(
        f"--coordinator must be HOST:PORT (process 0's address), got {coordinator!r}"
      )
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
        f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}"
      )
    if num_processes == 1:
      return Plan("single")
    return Plan("flags", coordinator, num_processes, process_id)
  switch = env.get("IR_JAX_DISTRIBUTED", "")
  if switch not in ("", "0", "1"):
    raise ConfigError(f"IR_JAX_DISTRIBUTED must be 0 or 1, got {switch!r}")
  if switch == "0":
    return Plan("single")
  if switch == "1":
    return Plan("env")
  if "SLURM_JOB_ID" in env and (_int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1:
    return Plan("slurm")
  if on_tpu_vm() if tpu_vm is None else tpu_vm:
    return Plan("tpu")
  return Plan("single")


def _cpu_only() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  return platforms.strip().lower() == "cpu"


def maybe_initialize(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> Plan:
  """Calls jax.distributed.initialize() when `plan(...)` says this is a multi-process job."""
  p = plan(coordinator, num_processes, process_id)
  if not p.distributed or jax.distributed.is_initialized():
    return p
  if _cpu_only():
    # The default CPU client has no cross-process collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=p.coordinator, num_processes=p.num_processes, process_id=p.process_id
  )
  return p


def gathers_by_layer(shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> bool:
  """Whether `host_array` gathers an array across hosts one leading index at a time: a
  NamedSharding'd array of rank >= 3 whose leading axis is not split (a layers axis over
  per-layer blocks, as the closed-form fits' statistics `[L, 2, d, ...]` are)."""
  return (
    len(shape) >= 3
    and shape[0] > 1
    and isinstance(sharding, jax.sharding.NamedSharding)
    and sharding.shard_shape(shape)[0] == shape[0]
  )


def _take(x: jax.Array, i: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


@functools.lru_cache(maxsize=None)
def layer_gather(sharding: jax.sharding.NamedSharding) -> Any:
  """`(x, i) -> x[i]` replicated on every device of `sharding`'s mesh, jitted once per
  sharding (the index is an argument): one block whole on every chip, not the whole array."""
  return jax.jit(_take, out_shardings=sharding.update(spec=PartitionSpec()))


def host_array(x) -> np.ndarray:
  """The whole value of `x` as a numpy array on every process.

  A fully addressable array (one process, or replicated) is fetched directly; one
  that spans other processes' devices (data- or FSDP-sharded across hosts) is gathered
  with a collective every process must call (in the same order): first replicated on
  every chip, then fetched from a local one. An array with a leading layers axis
  (`gathers_by_layer`) is gathered one leading index at a time (`layer_gather`), so a
  chip holds one layer's block whole instead of the whole array (Llama-2-7B's X^T X:
  0.125 GiB per layer instead of 4 GiB); the others whole, by
  `multihost_utils.process_allgather`. Either way the values are copied, not computed.
  Plain numpy values pass through.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if gathers_by_layer(x.shape, x.sharding):
      gather = layer_gather(x.sharding)
      out = np.empty(x.shape, x.dtype)
      for i in range(x.shape[0]):
        out[i] = np.asarray(gather(x, np.int32(i)).addressable_data(0))
      return out
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
