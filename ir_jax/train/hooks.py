"""What stages do around their SGD steps, besides the closed-form fit (ir_jax.train.init).

Start: fresh routers get a prior output bias. Finish (after the last step,
before the final checkpoint): the forecaster stage reports its held-out fit,
the router stage calibrates causal-mode thresholds.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax import sharding as sh
from ir_jax.data import pipeline
from ir_jax.data.packing import PACK
from ir_jax.distributed import host_array
from ir_jax.model import Llama
from ir_jax.progress import doing
from ir_jax.routing import RoutingSpec, calibrate_thresholds, mean_capacity, trained_spec
from ir_jax.train.config import Settings
from ir_jax.train.init import forecaster_report
from ir_jax.train.metrics import MetricWriter, log


def prior_router_bias(
  trainable: nnx.State, routing: RoutingSpec, shardings: nnx.State
) -> nnx.State:
  """Untrained routers (output bias exactly 0) start at the target execute rate.

  Gumbel gates execute with probability sigmoid(score); a bias of
  logit(capacity) makes fresh routers execute the target fraction from step
  one, so the sparsity penalty does not dominate the first steps. Top-k and
  threshold routing are unchanged by a constant shift. Routers trained before
  (non-zero bias) are left alone.
  """
  cap = mean_capacity(routing)
  cap = min(max(cap, 1e-3), 1 - 1e-3)
  prior = math.log(cap / (1.0 - cap))
  flat = dict(nnx.to_flat_state(trainable))
  changed = False
  for path, var in flat.items():
    if path[-1] == "b2" and path[-2].endswith("_router"):
      value = var[...]
      if not np.any(host_array(value)):  # gathered: FSDP may split it over hosts
        var[...] = jnp.full(value.shape, prior, value.dtype)
        changed = True
  if changed:
    log(f"[router] fresh routers: output bias set to logit({cap:.2f}) = {prior:.3f}")
    trainable = jax.device_put(trainable, shardings)
  return trainable


def report_forecasters(
  s: Settings, model: Llama, mesh: jax.sharding.Mesh, workdir: str, writer: MetricWriter, step: int
) -> None:
  """Held-out fit of the forecasters on a few eval batches: forecasters.json and a
  `forecaster_heldout` metrics record."""
  n = min(4, s.train.eval_batches)
  log(f"[forecaster] measuring the forecasts' held-out fit on {n} batch(es) ...")
  with doing("[forecaster] measuring the held-out fit"):
    _report_forecasters(s, model, mesh, workdir, writer, step, n)


def _report_forecasters(
  s: Settings,
  model: Llama,
  mesh: jax.sharding.Mesh,
  workdir: str,
  writer: MetricWriter,
  step: int,
  n: int,
) -> None:
  held = pipeline.make_iterator(
    s.data,
    s.data.eval_split,
    mode=PACK,
    shuffle=False,
    num_epochs=1,
    mesh=mesh,
    batch_axes=sh.BATCH_AXES,
    num_batches=n,
    prepare_if_missing=True,
  )
  try:
    batches = list(held)
  finally:
    held.close()
  if batches:
    info = forecaster_report(model, batches, os.path.join(workdir, "forecasters.json"))
    writer.write("forecaster_heldout", step, info)  # not the step's own (stage, step) record


def calibrate_router(
  s: Settings, num_batches: int, model: Llama, it: Iterator[dict[str, Any]]
) -> None:
  """Calibrates `model`'s causal-mode thresholds in place on the next `num_batches`
  training batches, packed as evaluation sees them (tokens, positions and segment ids,
  gathered whole on every process, so all calibrate alike)."""
  log(
    f"[router] calibrating causal-mode thresholds on {num_batches} batch(es) (a top-k pass, "
    "then causal passes, routed as decoding routes) ..."
  )
  from jax.experimental import multihost_utils

  gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
  cal = []
  for _ in range(num_batches):
    b = next(it)
    cal.append({k: gather(b[k]) for k in ("inputs", "positions", "segment_ids")})
  seq_len = s.stage_data("router").seq_len
  with doing("[router] calibrating causal-mode thresholds"):
    calibrate_thresholds(model, cal, trained_spec(model, s.routing.inference(), seq_len=seq_len))
