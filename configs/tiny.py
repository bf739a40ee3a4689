"""A tiny random Llama for CPU tests: GQA, untied head, odd sizes."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(
      vocab_size=257,
      hidden_size=64,
      intermediate_size=160,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      rms_norm_eps=1e-5,
      rope_theta=10_000.0,
      rope_scaling=None,
      max_position_embeddings=512,
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=None,
      dtype="float32",
      param_dtype="float32",
      scan_layers=True,
      remat=False,
      checkpoint="",  # empty: random init
  ))
  return cfg
