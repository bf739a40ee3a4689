"""Where routed decode can save time on a TPU: XLA's cost analysis of one decode step
(`python launch/tpu_decode_view.py` is the driver; its docstring says what is measured).

`variants` names the routed specs compared with dense, `step_cost` compiles one decode
step for a TPU topology and reads XLA's cost analysis, `measure` runs every (batch,
variant, depth) and derives per-layer costs, `table` renders them as ratios to dense.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax import aot
from ir_jax import routing as R
from ir_jax.bench_tpu import HBM_BYTES_PER_S, per_layer
from ir_jax.config import ConfigError, from_config_dict
from ir_jax.config_file import load_config
from ir_jax.rundir.state import abstract_state


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def variants(sparsity: float, layers: int) -> dict[str, R.RoutingSpec]:
  """Dense and the row-capacity variants at `sparsity` (capacity 1 - sparsity): both
  units, attention only, MLP only; sink protection off."""
  c = 1.0 - sparsity
  table = lambda a, m: tuple((a, m) for _ in range(layers))
  rows = lambda a, m: R.RoutingSpec(
    policy="informed", capacities=table(a, m), protect_sinks=False
  ).inference("topk")
  return {
    "dense": R.RoutingSpec(policy="dense"),
    "rows": rows(c, c),
    "rows-attn": rows(c, 1.0),
    "rows-mlp": rows(1.0, c),
  }


def step_cost(
  config: str,
  target: aot.Target,
  depth: int,
  batch: int,
  cache: int,
  spec_name: str,
  sparsity: float,
) -> dict[str, float]:
  """XLA FLOPs and bytes accessed of one decode step at `depth` unrolled layers."""
  c = load_config(config)
  c.model.num_layers = depth
  c.model.scan_layers = False
  cfg = from_config_dict(c.model)
  mesh = jax.sharding.Mesh(
    np.array(target.devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")
  )
  graphdef, abs_state, _ = abstract_state(cfg, mesh)
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  struct = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one)
  state = jax.tree.map(struct, abs_state)
  kv = jax.tree.map(struct, jax.eval_shape(lambda: R.init_cache(cfg, batch, cache)))
  spec = variants(sparsity, depth)[spec_name]
  fn = jax.jit(
    lambda st, kv, tok, pos: R.decode_body(nnx.merge(graphdef, st), kv, tok, pos, spec)[:2],
    donate_argnums=(1,),
  )
  t0 = time.perf_counter()
  compiled = fn.lower(
    state,
    kv,
    struct(jax.ShapeDtypeStruct((batch,), jnp.int32)),
    struct(jax.ShapeDtypeStruct((), jnp.int32)),
  ).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return dict(
    flops=float(ca.get("flops", 0.0)),
    bytes=float(ca.get("bytes accessed", 0.0)),
    compile_s=time.perf_counter() - t0,
  )


def measure(
  config: str,
  topology: str,
  batches: Sequence[int],
  cache: int,
  sparsity: float,
  depths: tuple[int, int],
  log: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
  """Per-layer cost of every variant at every batch (the difference of two depths), with
  the roofline time of the chip; a variant that does not fit one chip is marked so."""
  d0, d1 = depths
  if not 1 <= d0 < d1:
    raise ConfigError(f"--depths must be two increasing depths, got {d0},{d1}")
  target = aot.target_devices(topology, chips_per_host=(1, 1, 1))
  kind = topology.partition(":")[0]
  peak, bw = target.chip.peak_flops, HBM_BYTES_PER_S[kind]
  names = list(variants(sparsity, 1))
  out = dict(
    config=config,
    topology=topology,
    cache=cache,
    sparsity=sparsity,
    depths=[d0, d1],
    peak_flops=peak,
    hbm_bytes_per_s=bw,
    jax_version=jax.__version__,
    rows=[],
  )
  todo = sum(2 * (1 if b == 1 else len(names)) for b in batches)
  done, t_start = 0, time.perf_counter()
  for b in batches:
    for name in names:
      if name != "dense" and b == 1:
        continue  # one row: row capacity executes it (ceil(c x 1) = 1)
      costs = {}
      for depth in (d0, d1):
        try:
          costs[depth] = step_cost(config, target, depth, b, cache, name, sparsity)
        except jax.errors.JaxRuntimeError as e:  # the compiler's out-of-memory refusal
          if "RESOURCE_EXHAUSTED" not in str(e):
            raise
          why = str(e).splitlines()[0][:160]
          log(f"B {b} {name} depth {depth}: does not fit one chip ({why})")
          break
        done += 1
        el = time.perf_counter() - t_start
        log(
          f"[{done}/{todo}] B {b} {name} depth {depth}: flops {costs[depth]['flops']:.4g} "
          f"bytes {costs[depth]['bytes']:.4g} ({costs[depth]['compile_s']:.0f}s; elapsed "
          f"{el:.0f}s, ETA {el / done * (todo - done):.0f}s)"
        )
      if len(costs) < 2:
        out["rows"].append(dict(batch=b, variant=name, fits=False))
        continue
      per: dict[str, Any] = per_layer(costs[d0], costs[d1], (d0, d1))
      per["roofline_s"] = max(per["flops"] / peak, per["bytes"] / bw)
      per["bound"] = "compute" if per["flops"] / peak > per["bytes"] / bw else "memory"
      out["rows"].append(dict(batch=b, variant=name, per_layer=per, compiles=costs))
  return out


def table(out: dict[str, Any]) -> list[str]:
  """The markdown table of `measure`'s result: per layer, each variant as a ratio to dense."""
  d1 = out["depths"][1]
  dense = {
    r["batch"]: r["per_layer"]
    for r in out["rows"]
    if r["variant"] == "dense" and r.get("per_layer")
  }
  lines = [
    f"{out['config']} decode step on {out['topology']}, KV cache {out['cache']}, sparsity "
    f"{out['sparsity']:g}: per layer, ratio to dense",
    "",
    "| rows B | variant | XLA FLOPs | bytes | roofline time | bound |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for r in out["rows"]:
    if not r.get("per_layer") or r["batch"] not in dense:
      lines.append(f"| {r['batch']} | {r['variant']} | does not fit one chip at depth {d1} | | | |")
      continue
    d, v = dense[r["batch"]], r["per_layer"]
    if r["variant"] == "dense":
      lines.append(
        f"| {r['batch']} | dense | {v['flops']:.3g} | {v['bytes']:.3g} | "
        f"{v['roofline_s'] * 1e6:.1f} us | {v['bound']} |"
      )
    else:
      lines.append(
        f"| {r['batch']} | {r['variant']} | {v['flops'] / d['flops']:.2f} | "
        f"{v['bytes'] / d['bytes']:.2f} | {v['roofline_s'] / d['roofline_s']:.2f} | "
        f"{v['bound']} |"
      )
  return lines
