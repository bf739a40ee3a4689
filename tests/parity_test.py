"""The Flax Llama against transformers' LlamaForCausalLM on tiny random models."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_HF_CONFIGS, save_tiny_hf

import ir_jax
from ir_jax.config import LlamaConfig, load_hf_config


def torch_logits(path: str, tokens: np.ndarray) -> np.ndarray:
  model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("name", sorted(TINY_HF_CONFIGS))
def test_logits_match_transformers(tiny_hf_dirs, name):
  path = tiny_hf_dirs[name]
  vocab = TINY_HF_CONFIGS[name]["vocab_size"]
  tokens = np.random.RandomState(1).randint(0, vocab, (3, 37))
  ours = np.asarray(ir_jax.load_model(path)(jnp.asarray(tokens, jnp.int32)))
  ref = torch_logits(path, tokens)
  assert ours.shape == ref.shape == (3, 37, vocab)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_unrolled_equals_scanned(tiny_hf_dirs):
  path = tiny_hf_dirs["gqa_llama3_untied"]
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 97, (2, 19)), jnp.int32)
  scanned = ir_jax.load_model(path)(tokens)
  model = ir_jax.load_model(path)
  model.config = model.config.replace(scan_layers=False)
  np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(scanned), atol=1e-5)


def test_sharded_safetensors_with_index(tmp_path):
  path = save_tiny_hf(str(tmp_path / "sharded"), "gqa_llama3_untied", seed=3, max_shard_size="20KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  tokens = np.random.RandomState(3).randint(0, 97, (1, 23))
  ours = np.asarray(ir_jax.load_model(path)(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(ours, torch_logits(path, tokens), atol=1e-4, rtol=0)


def test_packed_batch_equals_separate_runs(tiny_hf_dirs):
  """Three documents packed in one row (plus padding) give each document's own logits."""
  path = tiny_hf_dirs["gqa_llama3_untied"]
  model = ir_jax.load_model(path)
  rng = np.random.RandomState(4)
  docs = [rng.randint(0, 97, n) for n in (7, 12, 5)]
  pad = 4
  tokens = np.concatenate(docs + [np.zeros(pad, np.int64)])[None]
  segs = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(pad)])[
    None
  ]
  pos = np.concatenate([np.arange(len(d)) for d in docs] + [np.arange(pad)])[None]
  packed = np.asarray(
    model(jnp.asarray(tokens, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(segs, jnp.int32))
  )
  start = 0
  for d in docs:
    ref = torch_logits(path, d[None])[0]
    np.testing.assert_allclose(packed[0, start : start + len(d)], ref, atol=1e-4, rtol=0)
    start += len(d)


def test_bfloat16_compute_close_to_float32(tiny_hf_dirs):
  path = tiny_hf_dirs["mha_tied_theta1e6"]
  tokens = jnp.asarray(np.random.RandomState(5).randint(0, 131, (2, 16)), jnp.int32)
  f32 = np.asarray(ir_jax.load_model(path)(tokens))
  bf16_model = ir_jax.load_model(path, dtype="bfloat16", param_dtype="bfloat16")
  assert bf16_model.embed_tokens[...].dtype == jnp.bfloat16
  bf16 = np.asarray(bf16_model(tokens))
  assert bf16.dtype == np.float32  # logits are always float32
  # bf16 keeps ~3 significant digits; the tiny model's logits are O(0.1).
  assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()
  assert np.abs(bf16 - f32).max() > 0  # really computed in bf16


def test_hf_config_spellings_agree(tiny_hf_dirs, tmp_path):
  """transformers 5 writes rope_parameters; transformers 4 wrote rope_theta/rope_scaling."""
  v5 = load_hf_config(tiny_hf_dirs["gqa_llama3_untied"])
  with open(os.path.join(tiny_hf_dirs["gqa_llama3_untied"], "config.json")) as f:
    hf = json.load(f)
  assert "rope_parameters" in hf
  params = hf.pop("rope_parameters")
  hf["rope_theta"] = params.pop("rope_theta")
  params["type"] = params.pop("rope_type")  # the oldest spelling
  hf["rope_scaling"] = params
  v4 = LlamaConfig.from_hf(hf)
  assert v4 == v5
  assert v5.rope_theta == 50_000.0 and v5.rope_type == "llama3"
  assert v5.rope_scaling["factor"] == 8.0
  # A round trip through our HF export spelling gives the same config back.
  assert LlamaConfig.from_hf(v5.to_hf()) == v5


def test_jit_compiles_once_per_shape(tiny_hf_dirs):
  from flax import nnx

  model = ir_jax.load_model(tiny_hf_dirs["mha_tied_theta1e6"])
  traces = []

  @nnx.jit
  def forward(m, t):
    traces.append(t.shape)
    return m(t)

  rng = np.random.RandomState(6)
  a = forward(model, jnp.asarray(rng.randint(0, 131, (2, 11)), jnp.int32))
  b = forward(model, jnp.asarray(rng.randint(0, 131, (2, 11)), jnp.int32))
  assert len(traces) == 1
  assert not np.allclose(np.asarray(a), np.asarray(b))
  forward(model, jnp.asarray(rng.randint(0, 131, (2, 12)), jnp.int32))
  assert len(traces) == 2
