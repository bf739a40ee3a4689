"""Per-unit forecasters (LFF) and routers, stacked over layers like the decoder.

Each decoder layer has two units, attention (0) and MLP (1); each unit has a
Forecaster predicting the unit's output from its normed input and a Router
scoring how much the token needs the real unit. Their parameters are Param
subclasses so a training stage can select them by type
(`nnx.Optimizer(model, tx, wrt=ForecasterParam)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ir_jax.config import LlamaConfig

Array = jax.Array
ATTN, MLP_UNIT = 0, 1
UNITS = ("attn", "mlp")


class ForecasterParam(nnx.Param):
  """Parameters of a Lightweight Feature Forecaster."""


class RouterParam(nnx.Param):
  """Parameters of a router."""


class Threshold(nnx.Variable):
  """Calibrated causal-mode score thresholds, one per unit (not trained)."""


class Capacity(nnx.Variable):
  """The trained per-unit capacity table (fraction of tokens executed), one per unit.

  Negative means "no table": the model routes at the uniform capacity it is asked for.
  Set by the router stage's fit (`ir_jax.fit.set_table`); not trained by gradients.
  """


class CalibratedFor(nnx.Variable):
  """The capacities the thresholds were calibrated for, one per unit (NO_TABLE: never).

  Set by `routing.calibrate_thresholds`; causal routing at other capacities is
  refused (`routing.check_calibrated`), since a threshold only executes the share of
  tokens it was calibrated for.
  """


NO_TABLE = -1.0


def _normal(
  rngs: nnx.Rngs, shape: tuple[int, ...], std: float, kind: type, axes: tuple[str, ...], dtype
) -> nnx.Variable:
  value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return kind(value, out_sharding=axes, eager_sharding=False)


def _zeros(shape: tuple[int, ...], kind: type, axes: tuple[str, ...], dtype) -> nnx.Variable:
  return kind(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)


class Forecaster(nnx.Module):
  """LFF(n) = W2 silu(W1 n + b1) + b2, d -> r -> d.

  W1, W2 start at N(0, 1e-3) and biases at 0, so an untrained forecaster
  outputs ~0 and approximating a unit with it behaves like skipping it.
  """

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, r, dt = cfg.hidden_size, cfg.lff_rank, cfg.weight_dtype
    self.w1 = _normal(rngs, (d, r), 1e-3, ForecasterParam, ("embed", "lff"), dt)
    self.b1 = _zeros((r,), ForecasterParam, ("lff",), dt)
    self.w2 = _normal(rngs, (r, d), 1e-3, ForecasterParam, ("lff", "embed"), dt)
    self.b2 = _zeros((d,), ForecasterParam, ("embed",), dt)
    self.dtype = cfg.compute_dtype

  def __call__(self, n_BxTxD: Array) -> Array:
    w = lambda p: p[...].astype(self.dtype)
    h_BxTxR = jax.nn.silu(n_BxTxD @ w(self.w1) + w(self.b1))
    return h_BxTxR @ w(self.w2) + w(self.b2)


class Router(nnx.Module):
  """One score per token: w2 . relu(W1 n + b1) + b2 (linear if router_hidden == 0).

  Higher score = more reason to execute the unit.
  """

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, h, dt = cfg.hidden_size, cfg.router_hidden, cfg.weight_dtype
    if h:
      self.w1 = _normal(rngs, (d, h), 0.02, RouterParam, ("embed", "router"), dt)
      self.b1 = _zeros((h,), RouterParam, ("router",), dt)
    self.w2 = _normal(rngs, (h or d,), 0.02, RouterParam, ("router" if h else "embed",), dt)
    # Shape [1], not a scalar: the stacking transform can only name axes that exist.
    self.b2 = _zeros((1,), RouterParam, ("score",), dt)
    self.hidden = h

  def __call__(self, n_BxTxD: Array) -> Array:
    """Scores `[B, T]` in float32."""
    n = n_BxTxD.astype(jnp.float32)
    if self.hidden:
      n = jax.nn.relu(n @ self.w1[...].astype(jnp.float32) + self.b1[...].astype(jnp.float32))
    return n @ self.w2[...].astype(jnp.float32) + self.b2[...].astype(jnp.float32)[0]


class RoutingLayer(nnx.Module):
  """The forecasters, routers, thresholds and capacity table row of one decoder layer."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.attn_lff = Forecaster(cfg, rngs)
    self.mlp_lff = Forecaster(cfg, rngs)
    self.attn_router = Router(cfg, rngs)
    self.mlp_router = Router(cfg, rngs)
    self.threshold = _zeros((len(UNITS),), Threshold, ("units",), jnp.float32)
    self.capacity = Capacity(
      jnp.full((len(UNITS),), NO_TABLE, jnp.float32), out_sharding=("units",), eager_sharding=False
    )
    self.calibrated_for = CalibratedFor(
      jnp.full((len(UNITS),), NO_TABLE, jnp.float32), out_sharding=("units",), eager_sharding=False
    )

  def forecaster(self, unit: int) -> Forecaster:
    return (self.attn_lff, self.mlp_lff)[unit]

  def router(self, unit: int) -> Router:
    return (self.attn_router, self.mlp_router)[unit]


def routing_stack(cfg: LlamaConfig, rngs: nnx.Rngs) -> RoutingLayer:
  """All layers' routing modules, parameters leading with a `layers` axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r: nnx.Rngs) -> RoutingLayer:
    return RoutingLayer(cfg, r)

  return create(rngs)


def lff_flops(cfg: LlamaConfig) -> int:
  """Matmul FLOPs of one forecaster per token (2 per multiply-add)."""
  return 4 * cfg.hidden_size * cfg.lff_rank


def router_flops(cfg: LlamaConfig) -> int:
  """Matmul FLOPs of one router per token (2 per multiply-add)."""
  d, h = cfg.hidden_size, cfg.router_hidden
  return 2 * d * h + 2 * h if h else 2 * d
