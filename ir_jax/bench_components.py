"""Predicted time of each part of a routed prefill on one accelerator chip, from XLA's cost.

`python -m ir_jax.bench --config configs/llama7b.py --tpu v5e:2x2 --components --flops 0.8`
compiles every part of one decoder layer separately for one chip of the slice
(libtpu; or `cpu:1`), one row of `seq_len` tokens in the config's dtype:

- K/V projections of every token; the attention unit (q projection, RoPE,
  scores and values over the keys, o projection) on k gathered queries, and
  the scores and values alone (so q/o = unit - core); the MLP on k tokens;
- a forecaster and a router on every token; the routing glue of one unit
  (top-k of the scores, gather of the k rows, scatter of their outputs into
  the forecast); an RMSNorm; the LM head.

Each program's `cost_analysis()` (unrolled, so XLA counts all of it) gives
FLOPs and bytes accessed; its time is the roofline max(FLOPs / peak, bytes /
HBM bandwidth). A layer is the sum of its parts (dense: every token; routed:
both units at the uniform capacity whose executed FLOPs, forecasters and
routers included, are `flops` of dense, `ir_jax.routing.flops`), the model
`num_layers` layers plus the head. This is a prediction: it assumes the parts
run one after another at their rooflines, with no overlap and no fusion across
them, and it counts no collectives (one chip holds the layer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax import routing as R
from ir_jax.attention import KEY_BLOCK, QUERY_CHUNK, _chunks, _core, _prefixes
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.forecast import Forecaster, Router
from ir_jax.model import DecoderLayer, RMSNorm
from ir_jax.routing.unit import gather, topk_indices

PARTS = (
  "K/V projections",
  "attention q/o projections",
  "attention scores+values",
  "MLP",
  "forecasters",
  "routers",
  "routing glue (top-k, gather, scatter)",
  "norms",
  "LM head",
)


def capacity_for_flops(cfg: LlamaConfig, seq_len: int, target: float) -> float:
  """The uniform capacity (both units, informed, top-k) whose executed FLOPs fraction is
  `target` (bisection on `routing.flops`; it falls as capacity falls)."""
  frac = lambda c: R.flops(cfg, R.RoutingSpec(policy="informed", sparsity=1.0 - c), seq_len)[
    "executed_fraction"
  ]
  lo, hi = 1.0 / seq_len, 1.0  # capacity 0 is forecast-only (no router): not this curve
  if not frac(lo) <= target < 1.0:
    raise ConfigError(
      f"--flops {target}: routing every unit at a uniform capacity reaches executed FLOPs "
      f"between {frac(lo):.3f} and 1 of dense for this model at {seq_len} tokens; pass a "
      "value in that range"
    )
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if frac(mid) < target else (lo, mid)
  return hi


@dataclasses.dataclass
class Part:
  name: str
  tokens: int
  flops: float
  bytes: float
  seconds: float


def core_chunks(q_index: np.ndarray, t: int) -> list[tuple[int, int]]:
  """(chunk length, key prefix length) of each query chunk `ir_jax.attention` runs for
  queries at `q_index` (sorted) against `t` keys in order."""
  nc, c = _chunks(len(q_index), QUERY_CHUNK)
  lengths = _prefixes(t, KEY_BLOCK)
  out = []
  for j in range(nc):
    need = int(q_index[j * c : (j + 1) * c].max()) + 1
    out.append((c, int(lengths[np.searchsorted(lengths, need)])))
  return out


def _abstract(make: Callable[[nnx.Rngs], nnx.Module]) -> tuple[Any, Any]:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))))
  return graphdef, state


def _cost(fn: Callable[..., Any], args: tuple[Any, ...], device: Any) -> tuple[float, float]:
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  compiled = jax.jit(fn).lower(*jax.tree.map(spec, args)).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def predict(
  cfg: LlamaConfig,
  seq_len: int,
  capacity: float,
  device: Any,
  peak_flops: float,
  hbm_bytes_per_s: float,
  log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
  """Per part: tokens, XLA FLOPs and bytes, roofline seconds; dense and routed totals."""
  t, d = seq_len, cfg.hidden_size
  dt = jnp.dtype(cfg.compute_dtype)
  k = max(1, int(round(capacity * t)))
  sds = lambda *shape, dtype=dt: jax.ShapeDtypeStruct(shape, dtype)
  pos_t = jnp.arange(t, dtype=jnp.int32)[None]
  # k gathered queries spread over the row, the last one at t - 1 (it attends every key).
  pos_k = jnp.asarray(np.linspace(0, t - 1, k).round().astype(np.int32))[None]
  layer_g, layer_s = _abstract(lambda r: DecoderLayer(cfg, r))
  lff_g, lff_s = _abstract(lambda r: Forecaster(cfg, r))
  rt_g, rt_s = _abstract(lambda r: Router(cfg, r))
  norm_g, norm_s = _abstract(lambda r: RMSNorm(cfg, r))
  n_kv, kd, h = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads

  def kv(st, n):
    return nnx.merge(layer_g, st).self_attn.keys_values(n, pos_t)

  def q_o(st, n, o, pos):
    a = nnx.merge(layer_g, st).self_attn
    return a.queries(n, pos), jnp.einsum("bshk,hkd->bsd", o, a._w(a.o_proj))

  def core(q, keys, values, mask):
    return _core(q, keys, values, mask, dt)

  def mlp(st, n):
    return nnx.merge(layer_g, st).mlp(n)

  def glue(scores, n, forecast, kk):
    idx = topk_indices(scores, kk)
    rows = gather(n, idx)
    return forecast.at[jnp.arange(1)[:, None], idx].set(rows)

  def head(w, n):
    return n @ w

  parts: dict[str, dict[int, Part]] = {p: {} for p in PARTS}

  def cost(fn: Callable[..., Any], *args: Any) -> tuple[float, float, float]:
    fl, by = _cost(fn, args, device)
    return fl, by, max(fl / peak_flops, by / hbm_bytes_per_s)

  def add(name: str, tokens: int, fn: Callable[..., Any], *args: Any) -> None:
    fl, by, sec = cost(fn, *args)
    parts[name][tokens] = Part(name, tokens, fl, by, sec)
    log(f"  {name} at {tokens} tokens: {fl:.4g} FLOPs, {by:.4g} bytes, {sec * 1e3:.3f} ms")

  add("K/V projections", t, kv, layer_s, sds(1, t, d))
  for m in sorted({t, k}):
    pos = pos_t if m == t else pos_k
    add("attention q/o projections", m, q_o, layer_s, sds(1, m, d), sds(1, m, h, kd), pos)
    add("MLP", m, mlp, layer_s, sds(1, m, d))
    # The scores and values run in query chunks, each against the key prefix its last
    # query reaches (ir_jax.attention); XLA counts a loop body once, so each chunk's
    # program is compiled alone and the chunks are summed.
    total = np.zeros(3)
    seen: dict[tuple[int, int], np.ndarray] = {}
    for c, length in core_chunks(np.asarray(pos)[0], t):
      if (c, length) not in seen:
        seen[(c, length)] = np.asarray(
          cost(
            core,
            sds(1, c, n_kv, h // n_kv, kd),
            sds(1, length, n_kv, kd),
            sds(1, length, n_kv, kd),
            sds(1, c, length, dtype=jnp.bool_),
          )
        )
      total += seen[(c, length)]
    parts["attention scores+values"][m] = Part("attention scores+values", m, *total.tolist())
    log(f"  attention scores+values at {m} tokens: {total[0]:.4g} FLOPs, {total[1]:.4g} bytes")
  add("forecasters", t, lambda st, n: nnx.merge(lff_g, st)(n), lff_s, sds(1, t, d))
  add("routers", t, lambda st, n: nnx.merge(rt_g, st)(n), rt_s, sds(1, t, d))
  add(
    "routing glue (top-k, gather, scatter)",
    k,
    lambda s, n, f: glue(s, n, f, k),
    sds(1, t, dtype=jnp.float32),
    sds(1, t, d),
    sds(1, t, d),
  )
  add("norms", t, lambda st, x: nnx.merge(norm_g, st)(x), norm_s, sds(1, t, d))
  add("LM head", t, head, sds(d, cfg.vocab_size), sds(1, t, d))

  layers = cfg.num_layers

  def side(m_attn: int, m_mlp: int, routed: bool, sec: Callable[[Part], float]) -> dict[str, float]:
    per = {
      "K/V projections": sec(parts["K/V projections"][t]),
      "attention q/o projections": sec(parts["attention q/o projections"][m_attn]),
      "attention scores+values": sec(parts["attention scores+values"][m_attn]),
      "MLP": sec(parts["MLP"][m_mlp]),
      "norms": 2 * sec(parts["norms"][t]),
    }
    if routed:
      per["forecasters"] = 2 * sec(parts["forecasters"][t])
      per["routers"] = 2 * sec(parts["routers"][t])
      per["routing glue (top-k, gather, scatter)"] = 2 * sec(
        parts["routing glue (top-k, gather, scatter)"][k]
      )
    out = {name: layers * s for name, s in per.items()}
    out["LM head"] = sec(parts["LM head"][t])
    return out

  roof = lambda p: p.seconds
  compute = lambda p: p.flops / peak_flops
  dense, routed = side(t, t, False, roof), side(k, k, True, roof)
  dense_c, routed_c = side(t, t, False, compute), side(k, k, True, compute)
  spec = R.RoutingSpec(policy="informed", sparsity=1.0 - capacity)
  return dict(
    seq_len=t,
    capacity=capacity,
    tokens_executed=k,
    executed_fraction=R.flops(cfg, spec, t)["executed_fraction"],
    parts=[dataclasses.asdict(p) for ps in parts.values() for p in ps.values()],
    dense_s=dense,
    routed_s=routed,
    dense_total_s=sum(dense.values()),
    routed_total_s=sum(routed.values()),
    dense_compute_s=sum(dense_c.values()),
    routed_compute_s=sum(routed_c.values()),
  )


def report(v: dict[str, Any], title: str) -> str:
  rows = [
    f"{title}: one row of {v['seq_len']} tokens, routed at uniform capacity "
    f"{v['capacity']:.3f} ({v['tokens_executed']} tokens per unit; executed FLOPs "
    f"{v['executed_fraction']:.3f} of dense). Predicted step: dense "
    f"{v['dense_total_s'] * 1e3:.2f} ms, routed {v['routed_total_s'] * 1e3:.2f} ms, speedup "
    f"{v['dense_total_s'] / v['routed_total_s']:.2f}x (ideal {1 / v['executed_fraction']:.2f}x); "
    f"at peak FLOPs alone (every part compute-bound): dense {v['dense_compute_s'] * 1e3:.2f} ms, "
    f"routed {v['routed_compute_s'] * 1e3:.2f} ms, "
    f"{v['dense_compute_s'] / v['routed_compute_s']:.2f}x",
    "",
    "| part | dense ms | share | routed ms | share |",
    "| --- | --- | --- | --- | --- |",
  ]
  dt, rt = v["dense_total_s"], v["routed_total_s"]
  for p in PARTS:
    a, b = v["dense_s"].get(p, 0.0), v["routed_s"].get(p, 0.0)
    rows.append(f"| {p} | {a * 1e3:.2f} | {a / dt:.1%} | {b * 1e3:.2f} | {b / rt:.1%} |")
  return "\n".join(rows)
