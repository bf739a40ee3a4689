"""Timing and reporting for `ir_jax.bench`: interleaved timing rounds, statistics, the tables.

`time_variants` times compiled programs (`ir_jax.bench_programs`) in interleaved
rounds; `summarize` turns the times into speedups, ideal speedups from the
executed-FLOPs fraction (`ir_jax.routing.flops`) and efficiencies; `table`
prints them as the console and docs/performance.md tables.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ir_jax import routing as R
from ir_jax.bench_programs import Variant, _stats
from ir_jax.config import LlamaConfig


# ------------------------------------------------------------------ timing
def time_variants(
  variants: Sequence[Variant], reps: int, warmup: int, log: Callable[[str], None] = lambda _: None
) -> None:
  """Warm-up, then `reps` interleaved rounds over all variants; appends to `.times`."""
  for v in variants:
    for _ in range(warmup):
      jax.block_until_ready(v.fn(*v.args))
  for r in range(reps):
    for v in variants:
      t0 = time.perf_counter()
      res = jax.block_until_ready(v.fn(*v.args))
      v.times.append(time.perf_counter() - t0)
      if v.execution in ("threshold", "rows") and "realized_sparsity" not in v.info:
        gates = np.asarray(res[1])
        v.info["exec_rate"] = gates.mean(axis=(0, 3)).tolist()  # [L, 2]
        v.info["realized_sparsity"] = float(1.0 - gates.mean())
    log(
      f"round {r + 1}/{reps}: " + "  ".join(f"{v.name} {v.times[-1] * 1e3:.0f}ms" for v in variants)
    )


def _decode_fractions(cfg: LlamaConfig, v: Variant, cache_len: int) -> None:
  """Decode FLOPs fractions at the realized per-unit execute rates.

  A skipped unit is not computed (one row per step: exact; several rows: the
  unit runs when any row executes, counted from the gates), so executed is
  computed from the per-step 'any row executes' rate and ideal from the
  per-token rate. Static row capacity (`rows`) runs exactly the executed rows,
  so both fractions come from the per-token rate. Per step, attention reads
  the whole static cache.
  """
  if v.execution not in ("threshold", "rows"):
    return
  rate = np.asarray(v.info["exec_rate"], np.float64)  # per token
  any_rate = rate if v.execution == "rows" else np.asarray(v.info["any_rate"], np.float64)
  for key, caps in (("ideal_fraction", rate), ("executed_fraction", any_rate)):
    spec = R.RoutingSpec(
      policy="informed",
      mode="causal",
      capacities=tuple(tuple(float(c) for c in row) for row in caps),
    )
    v.info[key] = R.flops(cfg, spec, cache_len)["ideal_fraction"]


def summarize(variants: Sequence[Variant], cfg: LlamaConfig, cache_len: int) -> dict[str, Any]:
  """Per-variant statistics and per-sparsity speedups, efficiencies and memory."""
  by_name = {v.name: v for v in variants}
  recs = {}
  for v in variants:
    _decode_fractions(cfg, v, cache_len)
    st = _stats(v.times)
    recs[v.name] = dict(
      kind=v.kind,
      sparsity=v.sparsity,
      execution=v.execution,
      tokens=v.tokens,
      times_s=v.times,
      time_s=st,
      tokens_per_s=v.tokens / st["median"],
      **{k: x for k, x in v.info.items() if k not in ("thresholds",)},
    )

  def compare(kind: str, name: str) -> dict[str, Any] | None:
    dense, v = by_name.get(f"{kind}/dense"), by_name.get(name)
    if dense is None or v is None:
      return None
    ratios = np.asarray(dense.times) / np.asarray(v.times)  # same round: same background load
    speed = float(np.median(dense.times) / np.median(v.times))
    ideal = 1.0 / v.info["executed_fraction"]
    return dict(
      speedup=speed,
      speedup_per_round=_stats(ratios),
      ideal_speedup=ideal,
      efficiency=speed / ideal,
      executed_fraction=v.info["executed_fraction"],
      ideal_fraction=v.info["ideal_fraction"],
      realized_sparsity=v.info.get("realized_sparsity"),
      tokens_per_s=recs[name]["tokens_per_s"],
      peak_bytes=v.info["memory"]["peak_bytes"],
    )

  sparsities = sorted({v.sparsity for v in variants if v.sparsity is not None})
  prefill, decode, decode_rows = [], [], []
  for s in sparsities:
    row = compare("prefill", f"prefill/routed@{s:g}")
    if row is not None:
      mask = compare("prefill", f"prefill/mask@{s:g}")
      if mask is not None:
        row["mask"] = {
          k: mask[k]
          for k in (
            "speedup",
            "speedup_per_round",
            "tokens_per_s",
            "peak_bytes",
            "executed_fraction",
          )
        }
      prefill.append(dict(sparsity=s, **row))
    row = compare("decode", f"decode/routed@{s:g}")
    if row is not None:
      row["ideal_speedup_per_token"] = 1.0 / row["ideal_fraction"]
      decode.append(dict(sparsity=s, **row))
    row = compare("decode", f"decode/rows@{s:g}")
    if row is not None:
      decode_rows.append(dict(sparsity=s, **row))
  dense = {
    k: {
      "tokens_per_s": recs[f"{k}/dense"]["tokens_per_s"],
      "time_s": recs[f"{k}/dense"]["time_s"],
      "peak_bytes": recs[f"{k}/dense"]["memory"]["peak_bytes"],
    }
    for k in ("prefill", "decode")
    if f"{k}/dense" in recs
  }
  return dict(variants=recs, dense=dense, prefill=prefill, decode=decode, decode_rows=decode_rows)


def _mib(b: int) -> str:
  return f"{b / 2**20:.0f}"


def table(result: dict[str, Any]) -> str:
  """The console (and docs/performance.md) tables of one run."""
  lines = []
  d = result["dense"]
  if "prefill" in d:
    pd = d["prefill"]
    lines += [
      f"prefill {result['batch']} x {result['seq_len']} tokens: dense "
      f"{pd['tokens_per_s']:,.0f} tokens/s (median {pd['time_s']['median'] * 1e3:.1f} ms, "
      f"IQR {pd['time_s']['q25'] * 1e3:.1f}-{pd['time_s']['q75'] * 1e3:.1f}), peak "
      f"{_mib(pd['peak_bytes'])} MiB",
      "",
      "| sparsity | routed tokens/s | speedup (IQR per round) | ideal | efficiency | "
      "mask tokens/s | mask speedup | peak MiB routed / mask |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["prefill"]:
      m = r.get("mask")
      pr = r["speedup_per_round"]
      lines.append(
        f"| {r['sparsity']:g} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f} "
        f"({pr['q25']:.2f}-{pr['q75']:.2f}) | {r['ideal_speedup']:.2f} | "
        f"{r['efficiency']:.0%} | "
        + (
          f"{m['tokens_per_s']:,.0f} | {m['speedup']:.2f} | {_mib(r['peak_bytes'])} / "
          f"{_mib(m['peak_bytes'])} |"
          if m
          else f"- | - | {_mib(r['peak_bytes'])} / - |"
        )
      )
  if "decode" in d:
    dd = d["decode"]
    lines += [
      "",
      f"decode {result['batch']} row(s) x {result['decode_steps']} steps, KV cache of "
      f"{result['seq_len']}: dense {dd['tokens_per_s']:,.1f} tokens/s (median "
      f"{dd['time_s']['median'] * 1e3:.1f} ms, IQR {dd['time_s']['q25'] * 1e3:.1f}-"
      f"{dd['time_s']['q75'] * 1e3:.1f}), peak {_mib(dd['peak_bytes'])} MiB",
      "",
      "| sparsity | realized | routed tokens/s | speedup (IQR per round) | ideal | "
      "efficiency | peak MiB |",
      "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["decode"]:
      pr = r["speedup_per_round"]
      lines.append(
        f"| {r['sparsity']:g} | {r['realized_sparsity']:.2f} | {r['tokens_per_s']:,.1f} | "
        f"{r['speedup']:.2f} ({pr['q25']:.2f}-{pr['q75']:.2f}) | {r['ideal_speedup']:.2f} | "
        f"{r['efficiency']:.0%} | {_mib(r['peak_bytes'])} |"
      )
  if result.get("decode_rows"):
    lines += [
      "",
      f"decode {result['batch']} rows, static row capacity (each unit runs its top "
      f"ceil(c x {result['batch']}) rows by score, gathered; every row at position 0):",
      "",
      "| sparsity | realized | routed tokens/s | speedup (IQR per round) | ideal | "
      "efficiency | threshold-form speedup | peak MiB |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_s = {r["sparsity"]: r for r in result["decode"]}
    for r in result["decode_rows"]:
      pr = r["speedup_per_round"]
      thr = by_s.get(r["sparsity"])
      thr_speedup = f"{thr['speedup']:.2f}" if thr else "-"
      lines.append(
        f"| {r['sparsity']:g} | {r['realized_sparsity']:.2f} | {r['tokens_per_s']:,.1f} | "
        f"{r['speedup']:.2f} ({pr['q25']:.2f}-{pr['q75']:.2f}) | {r['ideal_speedup']:.2f} | "
        f"{r['efficiency']:.0%} | {thr_speedup} | {_mib(r['peak_bytes'])} |"
      )
  return "\n".join(lines)
