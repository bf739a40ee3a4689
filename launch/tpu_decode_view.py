"""Where routed decode can save time on a TPU: XLA's cost analysis of one decode step.

    python launch/tpu_decode_view.py --config configs/llama7b.py --topology v5e:1x1 \
        --batches 1,8,64,256 --cache 512 --depths 1,2 --json docs/bench/tpu_decode_view.json

Compiles `ir_jax.routing.decode_body` (one token per row, KV cache of
`--cache` positions, weights and cache on one chip) for a TPU topology with
libtpu, dense and routed, with the layers unrolled at two depths so the
per-layer cost is the difference (XLA's cost analysis counts a scanned body
once). Routed variants at `--sparsity` (capacity c = 1 - sparsity):
  rows       static row capacity, both units (top ceil(c x B) rows, gathered)
  rows-attn  the same for attention only (MLP executes every row)
  rows-mlp   the same for the MLP only
Sink protection is off in the routed variants: it only matters at position 0,
and its `lax.cond` (run every row when a sink is present) would be counted
with both branches. For the same reason the threshold form, whose skip is a
`lax.cond` per unit, is left to the analysis in docs/performance.md.
Per layer it reports XLA FLOPs and bytes accessed, and the roofline time
max(FLOPs / peak, bytes / HBM bandwidth) of the chip, each as a ratio to dense.
Needs libtpu (`pip install 'ir_jax[tpu]'`); nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ir_jax import aot  # noqa: E402
from ir_jax import routing as R  # noqa: E402
from ir_jax.bench_tpu import HBM_BYTES_PER_S, per_layer  # noqa: E402
from ir_jax.config import ConfigError, from_config_dict  # noqa: E402
from ir_jax.config_file import load_config  # noqa: E402
from ir_jax.files import write_json  # noqa: E402
from ir_jax.train.state import abstract_state  # noqa: E402


def variants(sparsity: float, layers: int) -> dict[str, R.RoutingSpec]:
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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/llama7b.py")
  p.add_argument("--topology", default="v5e:1x1")
  p.add_argument("--batches", default="1,8,64,256")
  p.add_argument("--cache", type=int, default=512)
  p.add_argument("--sparsity", type=float, default=0.4)
  p.add_argument("--depths", default="1,2")
  p.add_argument("--json")
  args = p.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  d0, d1 = (int(d) for d in args.depths.split(","))
  if not 1 <= d0 < d1:
    raise ConfigError(f"--depths must be two increasing depths, got {args.depths}")
  target = aot.target_devices(args.topology, chips_per_host=(1, 1, 1))
  kind = args.topology.partition(":")[0]
  peak, bw = target.chip.peak_flops, HBM_BYTES_PER_S[kind]
  names = list(variants(args.sparsity, 1))
  out = dict(
    config=args.config,
    topology=args.topology,
    cache=args.cache,
    sparsity=args.sparsity,
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
          costs[depth] = step_cost(args.config, target, depth, b, args.cache, name, args.sparsity)
        except jax.errors.JaxRuntimeError as e:  # the compiler's out-of-memory refusal
          if "RESOURCE_EXHAUSTED" not in str(e):
            raise
          print(
            f"B {b} {name} depth {depth}: does not fit one chip ({str(e).splitlines()[0][:160]})",
            file=sys.stderr,
            flush=True,
          )
          break
        done += 1
        el = time.perf_counter() - t_start
        print(
          f"[{done}/{todo}] B {b} {name} depth {depth}: flops {costs[depth]['flops']:.4g} "
          f"bytes {costs[depth]['bytes']:.4g} ({costs[depth]['compile_s']:.0f}s; elapsed "
          f"{el:.0f}s, ETA {el / done * (todo - done):.0f}s)",
          file=sys.stderr,
          flush=True,
        )
      if len(costs) < 2:
        out["rows"].append(dict(batch=b, variant=name, fits=False))
        continue
      per: dict[str, Any] = per_layer(costs[d0], costs[d1], (d0, d1))
      per["roofline_s"] = max(per["flops"] / peak, per["bytes"] / bw)
      per["bound"] = "compute" if per["flops"] / peak > per["bytes"] / bw else "memory"
      out["rows"].append(dict(batch=b, variant=name, per_layer=per, compiles=costs))
  dense = {
    r["batch"]: r["per_layer"]
    for r in out["rows"]
    if r["variant"] == "dense" and r.get("per_layer")
  }
  lines = [
    f"{args.config} decode step on {args.topology}, KV cache {args.cache}, sparsity "
    f"{args.sparsity:g}: per layer, ratio to dense",
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
  print("\n".join(lines))
  out["table"] = lines
  if args.json:
    write_json(args.json, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
