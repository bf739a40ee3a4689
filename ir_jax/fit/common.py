"""What every closed-form fit shares: the dense pass that hands each unit's input and output
to a statistic, the streaming sum over batches, the centred moments of a ridge solve, and
the write of a host-side solution back into the model.

Every pass is one jitted function per batch whose outputs have a leading
layers axis `[L, 2, ...]`. All are traced on the model's mesh
(`pass_context`), so the model's activation constraints split the tokens over
the batch axes as in the training steps; each layer's d x d statistics are
pinned to be split along a feature dimension over every mesh axis that divides
d (`_split_features`; not along the layers, which `ir_jax.sharding`
replicates), and the error-curve pass's per-token outputs over the batch axes
as the tokens are (`_split_tokens`). Llama-2-7B's forecaster moments (X^T X and
X^T Y, 128 matrices of 4096^2 float32, 8.6 GB) are then 2 GiB per chip on 4
v5e chips and 0.5 on 16; the router moments half that. Traced without a mesh,
XLA replicated the batch inside a pass (per-chip temporaries grew with the
global batch: the error-curve pass 5.4 GiB per chip on 64 v5e chips). The
passes are `nnx.jit(graph_updates=False)`: they return their statistics only,
not the model state (one more copy of the model per chip). `_accumulate` keeps
only the running total beside each new pass (each output is added into it in
place and dropped). `python -m ir_jax.aot --stage
forecaster_stats,router_stats,error_curves` compiles the passes for a TPU
slice; docs/scaling.md has the figures.

Across processes (a pod): batches are global arrays whose rows live on
several hosts and the model may be FSDP-sharded over them, so every pass's
outputs (and the token masks that select from them) are gathered whole onto
every process (`ir_jax.distributed.host_array`, a collective all processes
call in the same order); the solves then run on the same numbers on every
host, and what is written back into the model is process 0's result, placed
with the sharding the variable had (`_set`), so replicas cannot drift apart.
On every host that is the whole statistics in float32 and then a float64 copy
(Llama-2-7B forecaster moments: 8.6 + 17.2 GB per host); on device the gather
replicates one layer's block at a time on every chip (one layer's X^T X of
both units, 0.125 GiB).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ir_jax import sharding as sh
from ir_jax.distributed import host_array
from ir_jax.model import Llama
from ir_jax.progress import doing
from ir_jax.routing.unit import sink_mask

Array = jax.Array
# SiLU(z + OFFSET) = z + OFFSET to within 1e-4 for z > -6 (z has unit std), and
# ReLU(z + OFFSET) is exactly linear for z > -OFFSET.
OFFSET = 12.0
# Router scores are SCORE_SCALE standard deviations of predicted log error.
SCORE_SCALE = 2.0
_LOG_EPS = 1e-12


def _ordinary(batch: dict[str, Array]) -> Array:
  """1.0 at real tokens that are not segment starts `[B, T]`."""
  seg = batch["segment_ids"]
  b, t = seg.shape
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return ((seg > 0) & ~sink_mask(index, seg)).astype(jnp.float32)


def _split_features(stats: Any, d: int) -> Any:
  """Pins one layer's per-unit statistics `[2, d, ...]` (X^T X, X^T Y, sums over tokens) to
  be split along their first feature dimension over every mesh axis that divides d, under
  the mesh of `pass_context` (no-op without one). With the activations split over the batch
  axes, XLA would otherwise all-reduce them into a whole copy on every chip (Llama-2-7B
  forecaster moments: 8 GiB per chip, three times over while accumulating)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return stats
  axes = tuple(a for a in sh.MESH_AXES if mesh.shape[a] > 1)
  while axes and d % math.prod(mesh.shape[a] for a in axes):
    axes = axes[1:]  # drop data first: fsdp (and tensor) are the model's own axes
  if not axes:
    return stats

  def pin(x):
    if x.ndim < 2 or x.shape[1] != d:
      return x
    spec = PartitionSpec(None, axes, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return jax.tree.map(pin, stats)


def _split_tokens(stats: Any) -> Any:
  """Pins one layer's per-token outputs `[2, n]` (n = the batch's B x T tokens, batch-major)
  to be split over the batch axes as the tokens are, under the mesh of `pass_context`
  (no-op without one); an axis that does not divide n is dropped (`sh.logical_to_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return stats

  def pin(x):
    spec = sh.logical_to_mesh((None, "batch"), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return jax.tree.map(pin, stats)


def _dense_units(
  model: Llama, batch: dict[str, Array], per_unit: Callable, per_token: bool = False
) -> Any:
  """Runs the dense model; `per_unit(rl, unit, n_BxTxD, u_BxTxD, x_BxTxD)` -> stats, stacked
  [L, 2, ...]; x is the residual stream the unit's output is added to. Each layer's stats
  are placed on the mesh of `pass_context`: d x d statistics split along a feature
  dimension (`_split_features`), or, `per_token`, per-token outputs `[2, B x T]` over the
  batch axes (`_split_tokens`)."""
  tokens, positions, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
  b, t = tokens.shape
  d = model.config.hidden_size
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  place = _split_tokens if per_token else lambda stats: _split_features(stats, d)

  def layer_fn(layer, routing_layer, x, _):
    n = layer.input_layernorm(x)
    a = layer.self_attn(n, positions, index, seg)
    sa = per_unit(routing_layer, 0, n, a, x)
    x = x + a
    n2 = layer.post_attention_layernorm(x)
    m = layer.mlp(n2)
    sm = per_unit(routing_layer, 1, n2, m, x)
    return x + m, place(jax.tree.map(lambda p, q: jnp.stack([p, q]), sa, sm))

  _, stats = model.run_layers(layer_fn, model.embed(tokens))
  return stats


def _approximation(routing_layer, unit: int, n: Array, greedy: bool) -> Array:
  """What approximating the unit puts in its place: the forecast, or nothing (greedy)."""
  return jnp.zeros_like(n) if greedy else routing_layer.forecaster(unit)(n)


def model_mesh(model: Llama | None) -> jax.sharding.Mesh | None:
  """The multi-device mesh the model's state is sharded over (None: none)."""
  if model is None:
    return None
  for x in jax.tree.leaves(nnx.state(model)):
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding) and s.mesh.size > 1:
      return s.mesh
  return None


def pass_context(model: Llama | None):
  """The context a statistics pass is traced in: the model's mesh, so that the model's
  activation constraints (`ir_jax.sharding.constrain`: the residual stream over the batch
  axes) take effect as in the training steps. Without it XLA replicated the batch in the
  pass: per-chip temporaries grew with the global batch (Llama-2-7B router moments, one
  2,048-token row per chip: 2.5 GiB on 16 v5e chips, 12.1 GiB on 64).

  Only models whose per-layer moments reach `SPLIT_MIN_BYTES` are placed so: on smaller
  ones a whole copy per chip costs little, and their passes keep the summation order
  (and so the bits) they had before (the multi-process tests compare them)."""
  if model is None or moments_bytes(model.config.hidden_size) < SPLIT_MIN_BYTES:
    return sh.use_mesh(None)
  return sh.use_mesh(model_mesh(model))


# Per-layer statistics (X^T X and X^T Y of both units, float32) from which the passes are
# traced on the model's mesh and split over it: 64 MiB (d >= 2,048; SmolLM2's d 576 is
# 5 MiB, Llama-2-7B's d 4,096 is 256 MiB).
SPLIT_MIN_BYTES = 64 * 2**20


def moments_bytes(d: int) -> int:
  """Bytes of one layer's forecaster moments: X^T X and X^T Y of two units, float32."""
  return 2 * 2 * d * d * 4


@functools.partial(jax.jit, donate_argnums=0)
def _add(total: Any, out: Any) -> Any:
  """total + out, leaf by leaf, written into the running total's buffers (donated)."""
  return jax.tree.map(jnp.add, total, out)


def _accumulate(
  fn: Callable,
  model: Llama,
  batches: Iterable[dict[str, Any]],
  progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
  """Sums `fn(model, batch)` over `batches` on device, traced in `pass_context(model)`; the
  total whole on every process in float64. Beside each batch's pass only the running total
  is kept: each output is added into it in place (`_add` donates the total) and dropped."""
  total = None
  for i, batch in enumerate(batches):
    with doing("compiling the statistics pass" if i == 0 else "gathering statistics"):
      with pass_context(model):
        out = fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
      total = out if total is None else _add(total, out)
      del out  # added (or now the total): no second copy waits beside the next pass
      if i == 0:  # the first batch's wait (compile and run) belongs to this label
        jax.block_until_ready(total)
    if progress is not None:
      progress(i + 1)
  if total is None:
    raise ValueError("a closed-form fit needs at least one batch")
  return {k: np.asarray(host_array(v), np.float64) for k, v in total.items()}


def _centered(m: dict[str, np.ndarray], ridge: float) -> tuple[np.ndarray, ...]:
  n = max(float(m["count"]), 1.0)
  mx = m["sx"] / n
  cxx = m["xtx"] / n - np.outer(mx, mx)
  cxx = 0.5 * (cxx + cxx.T)
  d = cxx.shape[0]
  lam = ridge * max(np.trace(cxx) / d, 1e-12)
  return n, mx, cxx, cxx + lam * np.eye(d)


def _stack(per: list[list[dict[str, np.ndarray]]], name: str, unit: int) -> np.ndarray:
  return np.stack([layer[unit][name] for layer in per])


def _set(var: nnx.Variable, value: np.ndarray) -> None:
  """Writes `value` into `var` with its dtype, shape and sharding. Across processes the
  value is process 0's (host-side solves may differ in the last bit from host to host,
  and every replica of a parameter must hold the same number)."""
  old = var[...]
  new = np.asarray(jnp.asarray(value, old.dtype).reshape(old.shape))
  if not isinstance(old, jax.Array):
    var[...] = jnp.asarray(new)
    return
  if not old.is_fully_addressable:
    new = np.asarray(multihost_utils.broadcast_one_to_all(new))
  var[...] = jax.device_put(new, old.sharding)
