"""Compile time of the routed forward, scanned (uniform capacity) vs unrolled (per-layer table).

Lowers and compiles on abstract inputs (no weights are allocated), for the
CPU backend of this machine:

  python launch/compile_time.py --config configs/llama7b.py --seq-len 2048 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.config import from_config_dict
from ir_jax.model import abstract_model
from ir_jax.routing import RoutingSpec


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return from_config_dict(mod.get_config().model)


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
  p.add_argument("--json", default=None, help="write the figures here")
  args = p.parse_args()
  cfg = load_config(args.config)
  c = 1 - args.sparsity
  rng = np.random.RandomState(0)
  # A per-layer table with the same mean capacity, different per layer.
  table = tuple(
    (float(np.clip(c + d, 0, 1)), float(np.clip(c - d, 0, 1)))
    for d in rng.uniform(-0.2, 0.2, cfg.num_layers)
  )
  out = dict(
    config=args.config, seq_len=args.seq_len, batch=args.batch, backend=jax.default_backend()
  )
  for name, spec in (
    ("dense_scanned", RoutingSpec(policy="dense")),
    ("uniform_scanned", RoutingSpec(sparsity=args.sparsity)),
    ("table_unrolled", RoutingSpec(capacities=table)),
  ):
    out[name] = compile_seconds(cfg, spec, args.batch, args.seq_len)
    print(name, out[name], flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
