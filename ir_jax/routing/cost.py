"""Matmul FLOPs of routed forwards: what a spec executes, and what a perfect skip would."""

from __future__ import annotations

from ir_jax.config import LlamaConfig
from ir_jax.forecast import lff_flops, router_flops
from ir_jax.routing.spec import RoutingSpec


def unit_flops(cfg: LlamaConfig, seq_len: int) -> tuple[float, float]:
  """Matmul FLOPs one token saves when its (attention, MLP) unit is approximated: q and o
  projections plus scores and values over `seq_len` keys; the whole SwiGLU MLP."""
  d, h, k, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  return float(2 * d * h * k * 2 + 2 * seq_len * h * k * 2), float(3 * 2 * d * f)


def flops(cfg: LlamaConfig, spec: RoutingSpec, seq_len: int, batch: int = 1) -> dict[str, float]:
  """Matmul FLOPs (2 per multiply-add) of one forward over `batch x seq_len` tokens.

  dense: the plain model. executed: what this implementation computes for
  `spec` (units run, forecasters, routers); for causal mode and
  compute="all" every unit runs, so executed exceeds dense there. ideal:
  what a perfect skip would compute at the spec's capacities. Attention
  scores count the full `[T, T]` product, as computed.
  """
  d, h, n, k, f, v, t = (
    cfg.hidden_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.intermediate_size,
    cfg.vocab_size,
    seq_len,
  )
  q_o = 2 * d * h * k * 2  # q and o projections
  kv = 2 * d * n * k * 2
  core = 2 * t * h * k * 2  # scores and weighted values over all T keys
  mlp = 3 * 2 * d * f
  head = 2 * d * v
  dense_layer = q_o + kv + core + mlp
  dense = batch * t * (cfg.num_layers * dense_layer + head)
  runs_all = spec.mode == "causal" or spec.compute == "all" or spec.gate == "gumbel"
  executed = ideal = batch * t * head
  for l in range(cfg.num_layers):
    ka, km = (
      (spec.k(t, l, 0), spec.k(t, l, 1))
      if spec.mode == "topk"
      else (spec.capacity(l, 0) * t, spec.capacity(l, 1) * t)
    )
    routed = spec.policy != "dense" and not (spec.mode == "topk" and ka == t and km == t)
    extra = 0
    if routed:
      if spec.policy != "greedy":
        extra += 2 * lff_flops(cfg)
      if spec.policy in ("informed", "greedy"):
        extra += 2 * router_flops(cfg)
    ideal += batch * (t * (kv + extra) + ka * (q_o + core) + km * mlp)
    if runs_all or spec.policy == "oracle":
      executed += batch * t * (dense_layer + extra)
    else:
      executed += batch * (t * (kv + extra) + ka * (q_o + core) + km * mlp)
  return dict(
    dense=float(dense),
    executed=float(executed),
    ideal=float(ideal),
    executed_fraction=executed / dense,
    ideal_fraction=ideal / dense,
  )
