"""`ir_jax.bench_profile`: XLA instructions charged to model components by their source.

Checked against hand-built cases: the qualified name around a line of a file
written here; a stack of frames classified by its innermost ir_jax frame; a toy
module laid out like the model (an `ir_jax/model.py` with `MLP` and
`Llama.logits`, an `ir_jax/forecast.py` with `Forecaster`) whose two matmuls
must land in their components, fused or not; and on the real tiny model, every
matmul of a dense and a routed forward is charged to a named component, with the
routed program's forecasters and gather/scatter present and absent from dense.
"""

from __future__ import annotations

import collections
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config
from flax import nnx

from ir_jax import bench_profile as BP
from ir_jax import routing as R
from ir_jax.model import init_model


def test_qualname_at_a_line(tmp_path):
  src = tmp_path / "m.py"
  src.write_text(
    "x = 1\n"
    "class A:\n"
    "  def f(self):\n"
    "    def g():\n"
    "      return 1\n"
    "    return g()\n"
    "def h():\n"
    "  return 2\n"
  )
  p = str(src)
  assert BP.qualname_at(p, 1) == ""
  assert BP.qualname_at(p, 3) == "A.f"
  assert BP.qualname_at(p, 5) == "A.f.g"
  assert BP.qualname_at(p, 6) == "A.f"
  assert BP.qualname_at(p, 8) == "h"


def _line_of(path: str, text: str) -> int:
  with open(path, encoding="utf-8") as f:
    for i, ln in enumerate(f, 1):
      if text in ln:
        return i + 1  # the first line of the body
  raise AssertionError(f"{text!r} not in {path}")


def test_innermost_ir_jax_frame_decides():
  import ir_jax.forecast
  import ir_jax.model

  model_py, forecast_py = ir_jax.model.__file__, ir_jax.forecast.__file__
  kv = (model_py, "keys_values", _line_of(model_py, "def keys_values"))
  mlp = (model_py, "__call__", _line_of(model_py, "class MLP") + 14)
  lff = (forecast_py, "__call__", _line_of(forecast_py, "h_BxTxR = jax.nn.silu") - 1)
  jax_internal = ("/usr/lib/python3/site-packages/jax/_src/numpy.py", "matmul", 10)
  assert BP.classify_frames([jax_internal, kv]) == "K/V projections"
  assert BP.qualname_at(model_py, mlp[2]).startswith("MLP")
  assert BP.classify_frames([mlp, kv]) == "MLP"
  assert BP.classify_frames([lff, mlp]) == "forecasters"
  assert BP.classify_frames([jax_internal]) == "other"
  assert BP.classify_frames([]) == "other"


_TOY_MODEL = """
import jax.numpy as jnp

class MLP:
  def __call__(self, x, w):
    return jnp.tanh(x @ w)

class Llama:
  def logits(self, x, w):
    return x @ w.T
"""
_TOY_FORECAST = """
class Forecaster:
  def __call__(self, x, w):
    return (x @ w) * 2.0
"""


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_toy_module_matmuls_land_in_their_components(tmp_path):
  pkg = tmp_path / "ir_jax"
  pkg.mkdir()
  (pkg / "model.py").write_text(_TOY_MODEL)
  (pkg / "forecast.py").write_text(_TOY_FORECAST)
  m = _load(str(pkg / "model.py"), "toy_ir_jax_model")
  fc = _load(str(pkg / "forecast.py"), "toy_ir_jax_forecast")

  def f(x, w1, w2, w3):
    h = m.MLP()(x, w1)
    y = fc.Forecaster()(h, w3)
    return m.Llama().logits(h + y, w2)

  args = (jnp.ones((64, 32)), jnp.ones((32, 32)), jnp.ones((48, 32)), jnp.ones((32, 32)))
  text = jax.jit(f).lower(*args).compile().as_text()
  assert sorted(set(_dot_components(text).values())) == ["LM head", "MLP", "forecasters"]


def _dot_components(text: str) -> dict[str, str]:
  """Every dot instruction of a compiled module (fused or not) -> its component."""
  mapping = BP.instruction_components(text)
  out = {}
  for ln in text.splitlines():
    m = re.match(r"\s+(?:ROOT\s+)?%?([\w.\-]+) = .*? dot\(", ln)
    if m:
      out[m.group(1)] = mapping[m.group(1)]
  assert out, text[:2000]
  return out


@pytest.fixture(scope="module")
def tiny():
  return init_model(tiny_llama_config(max_position_embeddings=256), seed=0)


def test_every_matmul_of_the_tiny_model_is_charged(tiny):
  graphdef, state = nnx.split(tiny)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 64)), jnp.int32)
  spec = R.RoutingSpec(policy="informed", sparsity=0.5)

  def comps(sp):
    fn = lambda st, t: nnx.merge(graphdef, st)(t, routing=sp)
    compiled = jax.jit(fn).lower(state, tokens).compile()
    text = compiled.as_text()
    dots = _dot_components(text)
    assert "other" not in dots.values(), sorted(n for n, c in dots.items() if c == "other")
    return compiled, dots, set(BP.instruction_components(text).values())

  dense, dense_dots, dense_comps = comps(None)
  routed, _, routed_comps = comps(spec)
  # The scanned layer body is compiled once: gate, up, down; q, o; k, v; scores, values;
  # and the LM head outside the loop (jax 0.10.2's CPU compiler fuses none of them together).
  assert collections.Counter(dense_dots.values()) == {
    "MLP": 3,
    "attention q/o projections": 2,
    "K/V projections": 2,
    "attention scores+values": 2,
    "LM head": 1,
  }
  for c in (
    "attention q/o projections",
    "attention scores+values",
    "K/V projections",
    "MLP",
    "LM head",
  ):
    assert c in dense_comps and c in routed_comps, (c, dense_comps, routed_comps)
  assert "forecasters" in routed_comps and "forecasters" not in dense_comps
  assert "routing glue (top-k, gather, scatter)" in routed_comps
  assert "routing glue (top-k, gather, scatter)" not in dense_comps

  result = BP.profile_program(routed, (state, tokens), calls=1, warmup=1)
  assert result["events"] > 0 and result["charged_s"] > 0
  assert set(result["components_s"]) <= set(BP.ORDER)
  assert result["charged_s"] == pytest.approx(sum(result["components_s"].values()))
