"""The model a run directory holds: its base weights and its newest whole adapters.

Below `ir_jax.train` (which writes runs) and `ir_jax.convert` (whose export reads a
run with a random base through `run_result`), so reading a run needs no training code.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from ir_jax import sharding as sh
from ir_jax.config import LlamaConfig
from ir_jax.model import Llama
from ir_jax.rundir import RUN_FILE, read_run, stage_dir
from ir_jax.rundir.checkpoints import open_manager, restore_adapters, restore_whole
from ir_jax.rundir.state import ModelState, adapter_target, init_state, replace_adapters


def run_result(workdir: str, mesh: jax.sharding.Mesh | None = None) -> ModelState:
  """The model a finished (or interrupted) run produced: base + its newest adapters."""
  meta = read_run(workdir)
  if meta is None:
    raise FileNotFoundError(f"{workdir}: no {RUN_FILE}; not an ir_jax.train workdir")
  cfg = LlamaConfig.from_dict(meta["model"])
  mesh = mesh or sh.make_mesh(sh.MeshConfig(data=-1))
  model_state = init_state(cfg, mesh, meta["base"], int(meta.get("seed", 0)))
  for stage in reversed(meta["stages"]):
    d = stage_dir(workdir, stage)
    if not os.path.isdir(d):
      continue
    mgr = open_manager(d)
    try:
      found = restore_whole(
        mgr, d, lambda n: restore_adapters(mgr, n, adapter_target(model_state)), quarantine=False
      )
    finally:
      mgr.close()
    if found is not None:
      replace_adapters(model_state, found[1])
      break
  return model_state


def load_run_model(workdir: str) -> Llama:
  """`run_result(workdir)` as a Llama module."""
  model_state = run_result(workdir)
  return nnx.merge(model_state.graphdef, model_state.state)
