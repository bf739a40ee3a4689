"""Llama-3.1-8B shapes: GQA 32/8 heads, 128k vocab, llama3 rope scaling."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(
      vocab_size=128256,
      hidden_size=4096,
      intermediate_size=14336,
      num_layers=32,
      num_heads=32,
      num_kv_heads=8,
      head_dim=128,
      rms_norm_eps=1e-5,
      rope_theta=500_000.0,
      rope_scaling=ml_collections.ConfigDict(dict(
          rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192)),
      max_position_embeddings=131072,
      tie_word_embeddings=False,
      bos_token_id=128000,
      eos_token_id=128001,
      pad_token_id=None,
      dtype="bfloat16",
      param_dtype="bfloat16",
      scan_layers=True,
      remat=True,
      checkpoint="",  # an imported ir_jax checkpoint of Llama-3.1-8B
  ))
  return cfg
