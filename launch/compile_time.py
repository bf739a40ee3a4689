"""Compile time of the routed forward: dense, uniform capacity and a per-layer capacity table,
the table both scanned (each unit switches among its distinct k) and unrolled.

Lowers and compiles on abstract inputs (no weights are allocated), for the
CPU backend of this machine:

  python launch/compile_time.py --config configs/llama7b.py --seq-len 2048 --json out.json
  python launch/compile_time.py --table docs/bench/llama7b_table_0.4.json   # a trained table
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.config import from_config_dict
from ir_jax.config_file import load_config
from ir_jax.files import write_json
from ir_jax.model import abstract_model
from ir_jax.routing import RoutingSpec, layer_ks


def model_config(path: str):
  """The model section of a config file."""
  return from_config_dict(load_config(path).model)


def compile_seconds(cfg, spec: RoutingSpec, batch: int, seq_len: int) -> dict:
  graphdef, state = nnx.split(abstract_model(cfg))
  f = lambda st, t: nnx.merge(graphdef, st)(t, routing=spec)
  toks = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  t0 = time.time()
  lowered = jax.jit(f).lower(state, toks)
  t1 = time.time()
  lowered.compile()
  t2 = time.time()
  return dict(lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/llama7b.py")
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--sparsity", type=float, default=0.4)
  p.add_argument(
    "--table",
    default=None,
    help="JSON file with a 'capacities' list, one (attn, mlp) per layer (default: a random "
    "table of mean 1 - sparsity with a different capacity in every layer)",
  )
  p.add_argument("--json", default=None, help="write the figures here")
  args = p.parse_args()
  cfg = model_config(args.config)
  if args.table:
    with open(args.table, encoding="utf-8") as f:
      table = tuple(tuple(float(c) for c in row) for row in json.load(f)["capacities"])
  else:
    c = 1 - args.sparsity
    rng = np.random.RandomState(0)
    table = tuple(
      (float(np.clip(c + d, 0, 1)), float(np.clip(c - d, 0, 1)))
      for d in rng.uniform(-0.2, 0.2, cfg.num_layers)
    )
  table_spec = RoutingSpec(capacities=table)
  ks = layer_ks(table_spec, cfg, args.seq_len)
  out = dict(
    config=args.config,
    seq_len=args.seq_len,
    batch=args.batch,
    backend=jax.default_backend(),
    table=args.table or "random",
    distinct_k=[len(set(ks[:, u].tolist())) for u in range(ks.shape[1])],
  )
  for name, model_cfg, spec in (
    ("dense_scanned", cfg, RoutingSpec(policy="dense")),
    ("uniform_scanned", cfg, RoutingSpec(sparsity=args.sparsity)),
    ("table_scanned", cfg, table_spec),
    ("table_unrolled", cfg.replace(scan_layers=False), table_spec),
  ):
    out[name] = compile_seconds(model_cfg, spec, args.batch, args.seq_len)
    print(name, out[name], flush=True)
  if args.json:
    write_json(args.json, out, indent=2)


if __name__ == "__main__":
  main()
