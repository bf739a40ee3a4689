"""Forecaster-stage cost vs a plain dense forward, on the same batch, in one process.

  python launch/forecaster_cost.py --config configs/smollm2_135m.py [--batch 4 --seq 256]

Random weights of the config's shapes (the cost does not depend on the values).
Times each jitted function after a warm-up call, median of --reps runs, and
prints tokens/s and the ratio of the forecaster train step to the dense forward
(with and without the LM head). Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/smollm2_135m.py")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--json", default="")
  args = p.parse_args()

  from ir_jax.config_file import load_config
  from ir_jax.files import write_json
  from ir_jax.forecast import ForecasterParam
  from ir_jax.model import init_model
  from ir_jax.provenance import git_commit
  from ir_jax.train import settings_from_config, steps
  from ir_jax.train.stages import STAGES

  s = settings_from_config(load_config(args.config))
  cfg = s.model
  model = init_model(cfg, 0)
  graphdef, trainable, frozen = nnx.split(model, ForecasterParam, ...)
  b, t = args.batch, args.seq
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
    "segment_ids": jnp.ones((b, t), jnp.int32),
  }

  @jax.jit
  def dense_logits(tr, fr, batch):
    m = nnx.merge(graphdef, tr, fr)
    return m(batch["inputs"], batch["positions"], batch["segment_ids"])

  @jax.jit
  def dense_hidden(tr, fr, batch):  # the layers only: what the forecaster stage must run
    m = nnx.merge(graphdef, tr, fr)
    idx = batch["positions"]
    x, _ = m.run_layers(
      lambda layer, _r, x, _: (layer(x, idx, idx, batch["segment_ids"]), None),
      m.embed(batch["inputs"]),
    )
    return x

  tx = steps.optimizer(s.train.forecaster)
  opt = tx.init(trainable)
  train_step = jax.jit(steps.make_train_step(graphdef, STAGES["forecaster"].loss_fn(s), tx))

  def timed(fn, *a) -> list[float]:
    jax.block_until_ready(fn(*a))  # compile + warm-up
    out = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*a))
      out.append(time.perf_counter() - t0)
    return out

  step0 = jnp.asarray(0, jnp.int32)
  results = {
    "dense_forward_logits": timed(dense_logits, trainable, frozen, batch),
    "dense_forward_layers": timed(dense_hidden, trainable, frozen, batch),
    "forecaster_train_step": timed(train_step, trainable, opt, frozen, batch, step0),
  }
  tokens = b * t
  rec = {
    "config": args.config,
    "batch": b,
    "seq_len": t,
    "reps": args.reps,
    "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
    "commit": git_commit(short=True),
  }
  for k, v in results.items():
    med = statistics.median(v)
    rec[k] = {"median_s": med, "min_s": min(v), "max_s": max(v), "tokens_per_s": tokens / med}
  fc = rec["forecaster_train_step"]["median_s"]
  rec["ratio_vs_forward_logits"] = fc / rec["dense_forward_logits"]["median_s"]
  rec["ratio_vs_forward_layers"] = fc / rec["dense_forward_layers"]["median_s"]
  for k in results:
    print(
      f"{k:24s} {rec[k]['median_s']:.3f} s  ({rec[k]['tokens_per_s']:.0f} tok/s, "
      f"min {rec[k]['min_s']:.3f} max {rec[k]['max_s']:.3f})"
    )
  print(
    f"forecaster step / dense forward with LM head: {rec['ratio_vs_forward_logits']:.2f}x; "
    f"/ layers only: {rec['ratio_vs_forward_layers']:.2f}x"
  )
  if args.json:
    write_json(args.json, rec, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
