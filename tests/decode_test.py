"""Decode paths: lazily sliced weights (a skipped unit reads none of its weights) and
static row capacity for several rows, against independent references."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from routing_test import make_model, tokens

from ir_jax import routing as R
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.model import init_model

# Odd sizes, so each weight's per-layer shape names it in the HLO.
CFG = LlamaConfig(
  vocab_size=67,
  hidden_size=40,
  intermediate_size=88,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  rope_theta=10_000.0,
  lff_rank=6,
  router_hidden=12,
  max_position_embeddings=64,
)


# ------------------------------------------------------ HLO: weights in branches
def _computations(hlo: str) -> dict[str, list[str]]:
  comps, cur = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      cur = (line.split()[1] if line.startswith("ENTRY") else line.split()[0]).lstrip("%")
      comps[cur] = []
    elif cur and line.startswith(" "):
      comps[cur].append(line)
  return comps


_CALLS = re.compile(
  r"(calls|branch_computations|to_apply|body|condition)=\{?([^}]*?)\}?(?:,\s*\w+=|$)"
)


def _callers(comps: dict[str, list[str]]) -> dict[str, list[tuple[str, str]]]:
  """computation -> [(caller computation, how it is called)]"""
  out: dict[str, list[tuple[str, str]]] = {}
  for name, lines in comps.items():
    for line in lines:
      for kind, names in _CALLS.findall(line):
        for callee in re.split(r",\s*", names):
          if callee.strip():
            out.setdefault(callee.strip().lstrip("%"), []).append((name, kind))
  return out


def _only_in_branches(comp: str, callers, seen=()) -> bool:
  """Every call path from the entry computation to `comp` passes a conditional branch."""
  if comp in seen:
    return True
  ups = callers.get(comp, [])
  if not ups:
    return False  # reached the entry computation without a branch
  return all(
    kind == "branch_computations" or _only_in_branches(up, callers, seen + (comp,))
    for up, kind in ups
  )


def test_skipped_unit_reads_none_of_its_weights():
  """In the compiled decode step, each query/output projection and MLP weight is
  sliced out of the layer stack only inside a conditional branch (the unit's
  execute branch), never on the path that runs when the unit is skipped."""
  model = make_model(CFG)
  spec = R.RoutingSpec(policy="informed", sparsity=0.5, mode="causal")
  R.calibrate_thresholds(model, [tokens(2, 16, 1, CFG.vocab_size)], spec)
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda st, c, t, p: R.decode_body(nnx.merge(graphdef, st), c, t, p, spec))
  hlo = (
    step.lower(state, R.init_cache(CFG, 1, 16), jnp.zeros((1,), jnp.int32), jnp.int32(3))
    .compile()
    .as_text()
  )
  comps = _computations(hlo)
  callers = _callers(comps)
  assert any(" conditional(" in line for lines in comps.values() for line in lines)

  gated, ungated = {}, {}
  for path, var in nnx.to_flat_state(nnx.state(model.layers, nnx.Param)):
    name = "/".join(str(p) for p in path)
    shape = ",".join(str(d) for d in (1,) + var.shape[1:])
    unit_weight = "q_proj" in name or "o_proj" in name or "mlp" in name
    (gated if unit_weight else ungated).setdefault(shape, []).append(name)
  assert set(gated).isdisjoint(ungated), "test sizes must tell the weights apart"
  found = 0
  for comp, lines in comps.items():
    for line in lines:
      m = re.search(r"= f32\[([\d,]+)\]\S* dynamic-slice\(", line)
      if m and m.group(1) in gated:
        found += 1
        assert _only_in_branches(comp, callers), (gated[m.group(1)], comp, line.strip()[:120])
  # Every gated weight kind is sliced somewhere (q, o, gate, up, down).
  assert found >= 5


# ------------------------------------------------------------ row capacity
def test_row_k_is_ceil():
  spec = R.RoutingSpec(sparsity=0.6)
  assert [R.row_k(spec, b, 0, 0) for b in (1, 2, 5, 8, 32)] == [
    math.ceil(0.4 * b - 1e-9) for b in (1, 2, 5, 8, 32)
  ]
  assert R.row_k(R.RoutingSpec(sparsity=1.0), 8, 0, 1) == 0
  assert R.row_k(R.RoutingSpec(policy="dense"), 8, 0, 1) == 8


def test_route_rows_executes_exactly_the_top_rows():
  """One unit, 8 rows: the executed rows are the top ceil(c x B) by router score
  (numpy argsort), they get the unit's output, the rest get the forecast."""
  model = make_model(CFG)
  graphdef, stacked = nnx.split(model.routing)
  routing_layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[1], stacked))  # layer 1's routers
  rng = np.random.default_rng(0)
  n = jnp.asarray(rng.standard_normal((8, 1, CFG.hidden_size)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((CFG.hidden_size, CFG.hidden_size)) * 0.1, jnp.float32)
  calls = []

  def unit(idx, n_Kx1xD):
    calls.append(n_Kx1xD.shape[0])
    return jnp.tanh(n_Kx1xD @ w)

  scores = np.asarray(routing_layer.mlp_router(n))[:, 0]
  forecast = np.asarray(routing_layer.mlp_lff(n))
  full = np.tanh(np.asarray(n) @ np.asarray(w))
  for sparsity in (0.0, 0.4, 0.6, 0.9, 1.0):
    spec = R.RoutingSpec(policy="informed", sparsity=sparsity)
    k = R.row_k(spec, 8, 0, 1)
    calls.clear()
    out, aux = R.route_unit(
      n,
      n,
      unit,
      routing_layer.mlp_lff,
      routing_layer.mlp_router,
      spec,
      k,
      jnp.float32(0),
      jax.random.key(0),
      rows=True,
    )
    top = set(np.argsort(-scores)[:k].tolist())
    gate = np.asarray(aux["gate_BxT"])[:, 0]
    assert set(np.flatnonzero(gate).tolist()) == top
    assert calls == ([8] if k == 8 else [k] if k else [])  # only the executed rows ran
    for b in range(8):
      np.testing.assert_allclose(
        np.asarray(out)[b], full[b] if b in top else forecast[b], atol=1e-6
      )
    assert float(aux["exec_rate"]) == pytest.approx(k / 8)


def _decode(model, toks_BxT, spec):
  b, t = toks_BxT.shape
  cache = R.init_cache(model.config, b, t)
  logits, gates = [], []
  for i in range(t):
    lg, cache, g = R.decode_step(model, cache, toks_BxT[:, i], jnp.int32(i), spec)
    logits.append(np.asarray(lg))
    gates.append(np.asarray(g))
  return np.stack(logits, 1), np.stack(gates)  # [B, T, V], [T, L, 2, B]


@pytest.mark.parametrize("capacities", [None, ((1.0, 0.5), (0.25, 0.75), (0.5, 0.0))])
def test_row_capacity_decode_counts_and_mask_form(capacities):
  """8 rows decoding together: every unit executes exactly row_k rows per step
  (all rows at the sink position 0), and the gathered program gives the mask
  form's logits (every unit on every row, then where(gate, unit, forecast))."""
  model = make_model(CFG)
  spec = R.RoutingSpec(policy="informed", sparsity=0.6, capacities=capacities).inference("topk")
  toks = tokens(8, 6, 3, CFG.vocab_size)
  logits, gates = _decode(model, toks, spec)
  mask_logits, mask_gates = _decode(model, toks, dataclasses.replace(spec, compute="all"))
  np.testing.assert_array_equal(gates, mask_gates)
  np.testing.assert_allclose(logits, mask_logits, atol=1e-4, rtol=0)
  assert gates[0].all()  # position 0: sinks everywhere
  want = np.array([[R.row_k(spec, 8, l, u) for u in range(2)] for l in range(CFG.num_layers)])
  np.testing.assert_array_equal(gates[1:].sum(-1), np.broadcast_to(want, gates[1:].shape[:-1]))
  # Full capacity is the dense model, step by step.
  dense = np.asarray(model(toks))
  full_logits, _ = _decode(
    model, toks, R.RoutingSpec(policy="informed", sparsity=0.0).inference("topk")
  )
  np.testing.assert_allclose(full_logits, dense, atol=1e-4, rtol=0)
  # Routing changes the output (the test would not notice a no-op).
  assert np.abs(logits[:, 1:] - dense[:, 1:]).max() > 1e-3


@pytest.mark.slow  # one compile per replayed step
def test_row_capacity_one_row_is_the_rows_own_forward():
  """A row's outputs depend on the other rows only through which rows execute:
  with the gates of a batched decode, rerunning each row alone under the same
  per-unit decisions (mask form, one row) gives the same logits."""
  model = make_model(CFG)
  spec = R.RoutingSpec(policy="informed", sparsity=0.5).inference("topk")
  toks = tokens(4, 5, 9, CFG.vocab_size)
  logits, gates = _decode(model, toks, spec)
  # The per-token decisions, replayed as a 0/1 capacity per (step, layer, unit) for one row.
  for row in range(4):
    cache = R.init_cache(CFG, 1, 5)
    for i in range(5):
      table = tuple(
        (float(gates[i, l, 0, row]), float(gates[i, l, 1, row])) for l in range(CFG.num_layers)
      )
      one = R.RoutingSpec(policy="informed", capacities=table).inference("topk")
      lg, cache, _ = R.decode_step(model, cache, toks[row : row + 1, i], jnp.int32(i), one)
      np.testing.assert_allclose(np.asarray(lg)[0], logits[row, i], atol=1e-4, rtol=0)


def test_decode_refuses_soft_gates():
  model = init_model(CFG, 0)
  with pytest.raises(ConfigError, match="hard gates"):
    R.decode_step(
      model,
      R.init_cache(CFG, 1, 4),
      jnp.zeros((1,), jnp.int32),
      jnp.int32(0),
      R.RoutingSpec(sparsity=0.5, gate="ste"),
    )


def test_generate_with_row_capacity_needs_no_calibration():
  model = make_model(CFG)
  spec = R.RoutingSpec(policy="informed", sparsity=0.5).inference("topk")
  out, step_logits = R.generate(model, tokens(4, 3, 5, CFG.vocab_size), 4, spec)
  assert out.shape == (4, 7) and step_logits.shape == (4, 6, CFG.vocab_size)
  np.testing.assert_array_equal(out[:, 3:], np.argmax(step_logits[:, 2:], -1))
