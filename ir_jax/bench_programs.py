"""The programs `python -m ir_jax.bench` times: dense, routed and mask prefill, KV-cache decode.

Each variant is compiled ahead of time (`jax.jit(...).lower(...).compile()`),
with its inputs and what the report needs about it: executed and ideal FLOPs
fractions (`ir_jax.routing.flops`), XLA's memory analysis and instruction
counts. Timing and the report are `ir_jax.bench`'s.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax import routing as R
from ir_jax.config import ConfigError
from ir_jax.model import Llama

Array = jax.Array


@dataclasses.dataclass
class Variant:
  """One compiled program to time, and what to report about it."""

  name: str
  kind: str  # "prefill" or "decode"
  sparsity: float | None
  execution: str  # "dense", "gathered", "mask" or "threshold"
  fn: Callable[..., Any]
  args: tuple[Any, ...]
  tokens: int
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  times: list[float] = dataclasses.field(default_factory=list)


def _memory(compiled: Any) -> dict[str, int]:
  """XLA's buffer assignment of a compiled program (bytes); peak = arguments + outputs
  (less aliased) + temporaries: deterministic, and what bounds the device memory."""
  ma = compiled.memory_analysis()
  get = lambda n: int(getattr(ma, n, 0) or 0) if ma is not None else 0
  arg, out = get("argument_size_in_bytes"), get("output_size_in_bytes")
  alias, temp = get("alias_size_in_bytes"), get("temp_size_in_bytes")
  return dict(
    argument_bytes=arg,
    output_bytes=out,
    alias_bytes=alias,
    temp_bytes=temp,
    peak_bytes=arg + out - alias + temp,
  )


_HLO_OPS = (
  "dot",
  "gather",
  "scatter",
  "dynamic-slice",
  "dynamic-update-slice",
  "conditional",
  "while",
  "sort",
  "custom-call",
)


def hlo_counts(hlo_text: str) -> dict[str, int]:
  """How many instructions of each kind in a compiled module (a scanned body counts once)."""
  return {
    op: len(re.findall(rf"^\s*(?:ROOT )?%?\S+ = .* {re.escape(op)}\(", hlo_text, re.M))
    for op in _HLO_OPS
  }


def _compile(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  info: dict[str, Any] = dict(compile_s=time.perf_counter() - t0, memory=_memory(compiled))
  try:
    info["hlo"] = hlo_counts(compiled.as_text())
  except Exception:  # as_text is a debugging aid some backends lack
    pass
  return compiled, info


def build_variants(
  model: Llama,
  batch: int,
  seq_len: int,
  decode_steps: int,
  sparsities: Sequence[float],
  *,
  k_multiple: int = 8,
  mask: bool = True,
  decode: bool = True,
  seed: int = 0,
  prefill: bool = True,
  table: Sequence[Sequence[float]] | None = None,
) -> list[Variant]:
  """Every program to time, compiled, with its inputs (random tokens).

  `table`: a per-unit capacity table `[L][2]` to route by, rescaled to each
  sparsity (`routing.rescale_table`); None: the model's trained table, else uniform.
  """
  cfg = model.config
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len)), jnp.int32)
  graphdef, state = nnx.split(model)
  out: list[Variant] = []

  def forward(spec: R.RoutingSpec | None) -> Callable[..., Any]:
    return lambda st, t: nnx.merge(graphdef, st)(t, routing=spec)

  def add(name, kind, s, execution, fn, args, n_tokens, **info):
    compiled, cinfo = _compile(fn, args)
    out.append(Variant(name, kind, s, execution, compiled, args, n_tokens, {**info, **cinfo}))

  def spec_at(s: float, **kw: Any) -> R.RoutingSpec:
    if table is not None:
      return R.RoutingSpec(policy="informed", capacities=R.rescale_table(table, s), **kw)
    return R.trained_spec(model, R.RoutingSpec(policy="informed", sparsity=s, **kw), sparsity=s)

  if not prefill:
    return (
      _decode_variants(model, tokens, decode_steps, sparsities, seed, spec_at) if decode else []
    )
  n_prefill = batch * seq_len
  dense_fl = R.flops(cfg, R.RoutingSpec(policy="dense"), seq_len, batch)
  add(
    "prefill/dense",
    "prefill",
    None,
    "dense",
    forward(None),
    (state, tokens),
    n_prefill,
    flops=dense_fl["dense"],
    executed_fraction=1.0,
    ideal_fraction=1.0,
    realized_sparsity=0.0,
  )
  for s in sparsities:
    # A model with a trained capacity table routes by it, rescaled to s (random weights: uniform).
    spec = spec_at(s, k_multiple=k_multiple)
    fl = R.flops(cfg, spec, seq_len, batch)
    ks = R.layer_ks(spec, cfg, seq_len)
    common = dict(
      realized_sparsity=float(1.0 - ks.mean() / seq_len), ideal_fraction=fl["ideal_fraction"]
    )
    add(
      f"prefill/routed@{s:g}",
      "prefill",
      s,
      "gathered",
      forward(spec),
      (state, tokens),
      n_prefill,
      flops=fl["executed"],
      executed_fraction=fl["executed_fraction"],
      **common,
    )
    if mask:
      mspec = dataclasses.replace(spec, compute="all")
      mfl = R.flops(cfg, mspec, seq_len, batch)
      add(
        f"prefill/mask@{s:g}",
        "prefill",
        s,
        "mask",
        forward(mspec),
        (state, tokens),
        n_prefill,
        flops=mfl["executed"],
        executed_fraction=mfl["executed_fraction"],
        **common,
      )
  if decode:
    out += _decode_variants(model, tokens, decode_steps, sparsities, seed, spec_at)
  return out


def _decode_variants(
  model: Llama,
  tokens_BxT: Array,
  steps: int,
  sparsities: Sequence[float],
  seed: int,
  spec_at: Callable[..., R.RoutingSpec],
) -> list[Variant]:
  """KV-cache decoding of `steps` tokens per row into a cache of T positions.

  The steps are teacher-forced with the prompt's own (random) tokens, so the
  routers see the distribution the thresholds were calibrated on; a step
  costs the same whatever the token. Thresholds: `calibrate_thresholds` on
  other random rows, one set per sparsity (the model state differs only there).
  """
  cfg = model.config
  b, t = tokens_BxT.shape
  if not 1 <= steps <= t:
    raise ConfigError(f"--decode-steps must be in [1, seq_len={t}], got {steps}")
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed + 1)
  feed_BxN = tokens_BxT[:, :steps]

  def run(spec: R.RoutingSpec) -> Callable[..., Any]:
    def fn(st, feed_BxN):
      m = nnx.merge(graphdef, st)
      cache = R.init_cache(cfg, b, t)

      def step(cache, i):
        logits, cache, gates = R.decode_body(m, cache, feed_BxN[:, i], i, spec)
        return cache, (jnp.argmax(logits, -1), gates)

      _, (ids, gates) = jax.lax.scan(step, cache, jnp.arange(feed_BxN.shape[1]))
      return ids, gates  # gates [N, L, 2, B]

    return fn

  n = b * steps
  out = []
  dense_spec = R.RoutingSpec(policy="dense")
  compiled, info = _compile(run(dense_spec), (state, feed_BxN))
  out.append(
    Variant(
      "decode/dense",
      "decode",
      None,
      "dense",
      compiled,
      (state, feed_BxN),
      n,
      dict(info, executed_fraction=1.0, ideal_fraction=1.0),
    )
  )
  for s in sparsities:
    spec = spec_at(s).inference("causal")
    calib = [jnp.asarray(rng.integers(0, cfg.vocab_size, (max(b, 2), t)), jnp.int32)]
    thr = R.calibrate_thresholds(model, calib, spec)
    # New containers around the same arrays: this sparsity's thresholds stay put
    # when the next calibration writes the model's.
    st = jax.tree.map(lambda a: a, nnx.state(model))
    compiled, info = _compile(run(spec), (st, feed_BxN))
    out.append(
      Variant(
        f"decode/routed@{s:g}",
        "decode",
        s,
        "threshold",
        compiled,
        (st, feed_BxN),
        n,
        dict(info, thresholds=thr.tolist()),
      )
    )
    if b > 1:  # static row capacity: each unit runs its top ceil(c x B) rows, gathered
      rspec = spec_at(s).inference("topk")
      compiled, info = _compile(run(rspec), (state, feed_BxN))
      out.append(
        Variant(f"decode/rows@{s:g}", "decode", s, "rows", compiled, (state, feed_BxN), n, info)
      )
  return out


def _stats(x: Sequence[float]) -> dict[str, float]:
  """Median, quartiles and range of a list of timings (or ratios)."""
  a = np.asarray(x, np.float64)
  q25, med, q75 = np.percentile(a, [25, 50, 75])
  return dict(
    median=float(med), q25=float(q25), q75=float(q75), min=float(a.min()), max=float(a.max())
  )
