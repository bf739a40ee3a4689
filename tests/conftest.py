"""Shared fixtures: tiny random HuggingFace Llama directories saved with transformers."""

from __future__ import annotations

import os

# Tests run on CPU; 8 fake devices let sharding tests build a mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# name -> transformers.LlamaConfig kwargs. Together they cover GQA and
# multi-head, tied and untied embeddings, non-default rope_theta, llama3 and
# linear rope scaling, an explicit head_dim, and odd sizes.
TINY_HF_CONFIGS = {
  "gqa_llama3_untied": dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    rope_theta=50_000.0,
    rope_scaling=dict(
      rope_type="llama3",
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=16,
    ),
    tie_word_embeddings=False,
  ),
  "mha_tied_theta1e6": dict(
    vocab_size=131,
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
  ),
  "headdim_linear_rope": dict(
    vocab_size=61,
    hidden_size=36,
    intermediate_size=50,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=14,
    rope_theta=20_000.0,
    rope_scaling=dict(rope_type="linear", factor=2.0),
    tie_word_embeddings=False,
  ),
}


def save_tiny_hf(path: str, name: str, seed: int = 0, **save_kwargs) -> str:
  import torch
  import transformers

  kw = dict(TINY_HF_CONFIGS[name], max_position_embeddings=256, rms_norm_eps=1e-5)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
  # Norm weights initialise to one; randomise them so a wrong mapping shows.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path, **save_kwargs)
  return path


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, str]:
  root = tmp_path_factory.mktemp("tiny_hf")
  return {n: save_tiny_hf(str(root / n), n) for n in TINY_HF_CONFIGS}
