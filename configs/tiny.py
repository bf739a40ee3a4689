"""A tiny random Llama for CPU tests: GQA, untied head, odd sizes."""

import ml_collections

from ir_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  cfg = default_config()  # train, routing and mesh sections with their defaults
  cfg.model = ml_collections.ConfigDict(
    dict(
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
      checkpoint="",  # empty: random weights, allowed by random_init below
      random_init=True,  # a smoke-test model: no pretrained weights exist for it
    )
  )
  # 49 short news articles (one per line, Latin-1) through the built-in byte
  # tokenizer, whose 257 ids match vocab_size above.
  cfg.data = ml_collections.ConfigDict(
    dict(
      name="local",
      files=("assets/text/news/lee.cor",),
      tokenizer="byte",
      split_mode="lines",
      seq_len=64,
      batch_size=8,
      data_dir="runs/tfds",
      validation_fraction=0.2,
      seed=0,
      add_bos=None,
      add_eos=True,  # <|endoftext|> (id 256) ends every document
      prefetch=0,
    )
  )
  # Seconds on a CPU: a few steps of each stage, checkpoints every 4 steps.
  cfg.train.stages = "forecaster,router"
  cfg.train.log_every = 2
  cfg.train.checkpoint_every = 4
  cfg.train.eval_batches = 2
  cfg.train.tensorboard = False
  cfg.train.forecaster.steps = 12
  cfg.train.router.steps = 12
  cfg.train.router.calibration_batches = 1
  cfg.train.lora.steps = 6
  cfg.train.lora.rank = 4
  cfg.routing.sparsity = 0.4
  return cfg
