"""`python -m ir_jax.bench --workdir RUN`: the speed of a trained model at its own table and budget.

For each prefill length (default 512 and 2,048 tokens, one row) it times the
dense model and the model routed as every entry point routes it
(`routing.trained_spec`: the run's FLOPs budget or sparsity, its trained
per-unit capacity table moved to that length), top-k, gathered. Decode: one row,
`steps` tokens after a prompt that fills the KV cache to the longest length
(the cache holds the prompt's keys and values from a dense prefill), dense and
routed causally with thresholds calibrated on random rows so every unit
executes at its table's capacity. All variants are timed in interleaved
rounds; beside each measured speedup stands the FLOP ideal
(`routing.flops`: 1 / executed fraction for prefill; for decode the fraction
at the realized per-unit execute rates, attention over the keys the timed
steps saw). `speed` in the JSON is the flat summary a quality table reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax import convert
from ir_jax import routing as R
from ir_jax.api import load_model
from ir_jax.bench_programs import Variant, _compile, _stats
from ir_jax.config import ConfigError
from ir_jax.model import Llama

Array = jax.Array


def load_trained(workdir: str | None, checkpoint: str | None) -> tuple[Llama, R.RoutingSpec, str]:
  """(model, the routing spec it was trained for, the path read); a clear error otherwise."""
  import os

  path = workdir or checkpoint
  assert path is not None
  if workdir and not os.path.isfile(os.path.join(workdir, "run.json")):
    raise ConfigError(
      f"--workdir {workdir}: no run.json; pass an ir_jax.train workdir (or --checkpoint "
      "for a checkpoint or export directory)"
    )
  if not os.path.exists(path):
    raise ConfigError(f"{path}: no such file or directory")
  model = load_model(path)
  spec = convert.routing_spec(path) if os.path.isdir(path) else None
  return model, spec or R.RoutingSpec(policy="informed"), path


def spec_for(model: Llama, spec: R.RoutingSpec, seq_len: int, k_multiple: int) -> R.RoutingSpec:
  """The spec prefill at `seq_len` routes by: the trained table at the run's budget."""
  spec = dataclasses.replace(spec.inference("topk"), k_multiple=k_multiple)
  if spec.policy == "dense":
    raise ConfigError("the run routes with policy 'dense': nothing to compare")
  return R.trained_spec(model, spec, seq_len=seq_len)


def prompt_cache(model: Llama, tokens_BxT: Array) -> dict[str, Array]:
  """KV cache `[L, B, T, N, K]` of a dense prefill of `tokens` (every layer's keys, values)."""
  b, t = tokens_BxT.shape
  index_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def layer_fn(layer, _r, x, _):
    k, v = layer.self_attn.keys_values(layer.input_layernorm(x), index_BxT)
    return layer(x, index_BxT, index_BxT, None), (k, v)

  _, (k, v) = model.run_layers(layer_fn, model.embed(tokens_BxT))
  dt = model.config.compute_dtype
  return dict(k=k.astype(dt), v=v.astype(dt))


def build(
  model: Llama,
  spec: R.RoutingSpec,
  seq_lens: Sequence[int],
  steps: int,
  k_multiple: int,
  seed: int,
  log: Callable[[str], None],
) -> tuple[list[Variant], dict[str, Any]]:
  """The compiled programs (prefill dense/routed per length, decode dense/routed) and
  what the report needs about each length's table."""
  cfg = model.config
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(model)
  out: list[Variant] = []
  tables: dict[str, Any] = {}

  def forward(sp: R.RoutingSpec | None) -> Callable[..., Any]:
    return lambda st, t: nnx.merge(graphdef, st)(t, routing=sp)

  for t in seq_lens:
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jnp.int32)
    sp = spec_for(model, spec, t, k_multiple)
    fl = R.flops(cfg, sp, t)
    ks = R.layer_ks(sp, cfg, t)
    tables[str(t)] = dict(
      capacities=[list(r) for r in R.layer_caps(sp, cfg).tolist()],
      executed_fraction=fl["executed_fraction"],
      ideal_fraction=fl["ideal_fraction"],
      realized_sparsity=float(1.0 - ks.mean() / t),
    )
    for name, s in ((f"prefill/dense@{t}", None), (f"prefill/routed@{t}", sp)):
      fn, info = _compile(forward(s), (state, tokens))
      frac = 1.0 if s is None else fl["executed_fraction"]
      out.append(
        Variant(
          name,
          "prefill",
          None,
          "dense" if s is None else "gathered",
          fn,
          (state, tokens),
          t,
          dict(info, executed_fraction=frac, seq_len=t),
        )
      )
    log(f"compiled prefill at {t} tokens")
  if steps:
    out += _decode(model, spec, max(seq_lens), steps, k_multiple, rng, tables)
    log(f"compiled decode: {steps} steps after a prompt of {max(seq_lens) - steps}")
  return out, tables


def _decode(model, spec, cache_len, steps, k_multiple, rng, tables) -> list[Variant]:
  """One row decoding `steps` tokens at positions cache_len - steps .. cache_len - 1."""
  cfg = model.config
  if not 1 <= steps < cache_len:
    raise ConfigError(f"--decode-steps must be in [1, {cache_len - 1}], got {steps}")
  first = cache_len - steps
  row = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, cache_len)), jnp.int32)
  graphdef, state = nnx.split(model)
  cache = jax.jit(lambda st, t: prompt_cache(nnx.merge(graphdef, st), t))(state, row)
  cspec = spec_for(model, spec, cache_len, k_multiple).inference("causal")
  calib = [jnp.asarray(rng.integers(0, cfg.vocab_size, (2, cache_len)), jnp.int32)]
  thr = R.calibrate_thresholds(model, calib, cspec)
  state = nnx.state(model)  # with the thresholds just calibrated
  feed = row[:, first:]

  def run(sp: R.RoutingSpec) -> Callable[..., Any]:
    def fn(st, cache, feed_1xN):
      m = nnx.merge(graphdef, st)

      def step(cache, i):
        logits, cache, gates = R.decode_body(m, cache, feed_1xN[:, i], first + i, sp)
        return cache, (jnp.argmax(logits, -1), gates)

      _, (ids, gates) = jax.lax.scan(step, cache, jnp.arange(feed_1xN.shape[1]))
      return ids, gates  # gates [N, L, 2, 1]

    return fn

  out = []
  for name, sp, exe in (
    ("decode/dense", R.RoutingSpec(policy="dense"), "dense"),
    ("decode/routed", cspec, "threshold"),
  ):
    fn, info = _compile(run(sp), (state, cache, feed))
    out.append(Variant(name, "decode", None, exe, fn, (state, cache, feed), steps, info))
  tables["decode"] = dict(
    cache_len=cache_len,
    first_position=first,
    capacities=[list(r) for r in R.layer_caps(cspec, cfg).tolist()],
    thresholds=np.asarray(thr).tolist(),
  )
  return out


def decode_ideal(cfg, exec_rate: np.ndarray, first: int, steps: int) -> float:
  """FLOPs fraction of one-row decode at the realized per-unit execute rates: a step at
  position p attends p + 1 keys; `routing.flops` at 2 * keys - 1 tokens counts that."""
  keys = first + (steps + 1) / 2  # mean keys over the timed steps
  spec = R.RoutingSpec(
    policy="informed",
    mode="causal",
    capacities=tuple(tuple(float(c) for c in r) for r in exec_rate),
  )
  return R.flops(cfg, spec, int(round(2 * keys - 1)))["ideal_fraction"]


def summarize(
  variants: Sequence[Variant], tables: dict[str, Any], cfg, steps: int
) -> dict[str, Any]:
  """Per length and for decode: dense and routed times, speedup (median of each, and per
  round), the FLOP ideal beside it and their ratio (efficiency)."""

  by = {v.name: v for v in variants}

  def side(v: Variant) -> dict[str, Any]:
    st = _stats(v.times)
    return dict(
      time_s=st,
      times_s=list(v.times),
      tokens_per_s=v.tokens / st["median"],
      peak_bytes=v.info["memory"]["peak_bytes"],
      compile_s=v.info["compile_s"],
    )

  def compare(dense: Variant, routed: Variant, ideal: float) -> dict[str, Any]:
    speed = float(np.median(dense.times) / np.median(routed.times))
    ratios = np.asarray(dense.times) / np.asarray(routed.times)  # same round, same load
    return dict(
      speedup=speed,
      speedup_per_round=_stats(ratios),
      ideal_speedup=ideal,
      efficiency=speed / ideal,
      dense=side(dense),
      routed=side(routed),
    )

  prefill = []
  for key, tab in tables.items():
    if key == "decode":
      continue
    t = int(key)
    row = compare(by[f"prefill/dense@{t}"], by[f"prefill/routed@{t}"], 1 / tab["executed_fraction"])
    prefill.append(dict(seq_len=t, batch=1, **tab, **row))
  decode = None
  if "decode/routed" in by:
    tab = tables["decode"]
    rate = np.asarray(by["decode/routed"].info["exec_rate"], np.float64)  # [L, 2], realized
    frac = decode_ideal(cfg, rate, tab["first_position"], steps)
    decode = dict(
      batch=1,
      steps=steps,
      **tab,
      exec_rate=rate.tolist(),
      realized_sparsity=float(1.0 - rate.mean()),
      ideal_fraction=frac,
      **compare(by["decode/dense"], by["decode/routed"], 1 / frac),
    )
  speed = {f"prefill_{r['seq_len']}": r["speedup"] for r in prefill}
  speed.update({f"prefill_{r['seq_len']}_ideal": r["ideal_speedup"] for r in prefill})
  if decode is not None:
    speed.update(decode=decode["speedup"], decode_ideal=decode["ideal_speedup"])
  return dict(prefill=prefill, decode=decode, speed=speed)


def table(result: dict[str, Any]) -> str:
  """The console (and docs/performance.md) table of one trained-model run."""
  lines = [
    f"{result['path']}: routing {result['routing']['policy']}, "
    + (
      f"FLOPs budget {result['routing']['flops']:g}"
      if result["routing"].get("flops")
      else f"sparsity {result['routing']['sparsity']:g}"
    )
    + f", k multiple {result['k_multiple']}",
    "",
    "| program | dense ms (IQR) | routed ms (IQR) | executed FLOPs | speedup (IQR per round) "
    "| ideal | efficiency |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]

  def ms(side):
    t = side["time_s"]
    return f"{t['median'] * 1e3:.1f} ({t['q25'] * 1e3:.1f}-{t['q75'] * 1e3:.1f})"

  rows = [(f"prefill 1 x {r['seq_len']}", r, r["executed_fraction"]) for r in result["prefill"]]
  d = result.get("decode")
  if d:
    name = f"decode 1 row x {d['steps']} steps at {d['first_position']}-{d['cache_len'] - 1}"
    rows.append((name, d, d["ideal_fraction"]))
  for name, r, frac in rows:
    pr = r["speedup_per_round"]
    lines.append(
      f"| {name} | {ms(r['dense'])} | {ms(r['routed'])} | {frac:.3f} | {r['speedup']:.2f} "
      f"({pr['q25']:.2f}-{pr['q75']:.2f}) | {r['ideal_speedup']:.2f} | {r['efficiency']:.0%} |"
    )
  if d:
    lines += ["", f"decode realized sparsity {d['realized_sparsity']:.3f}"]
  return "\n".join(lines)
