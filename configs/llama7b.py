"""Llama-2-7B shapes (bf16 weights; for pod runs and ahead-of-time compilation)."""

import ml_collections

from ir_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  cfg = default_config()  # train, routing and mesh sections with their defaults
  cfg.model = ml_collections.ConfigDict(
    dict(
      vocab_size=32000,
      hidden_size=4096,
      intermediate_size=11008,
      num_layers=32,
      num_heads=32,
      num_kv_heads=32,
      head_dim=128,
      rms_norm_eps=1e-5,
      rope_theta=10_000.0,
      rope_scaling=None,
      max_position_embeddings=4096,
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=None,
      dtype="bfloat16",
      param_dtype="bfloat16",
      scan_layers=True,
      remat=True,
      checkpoint="",  # an imported ir_jax checkpoint of Llama-2-7B (required to train)
      random_init=False,  # True: random weights instead (smoke tests of the pod setup)
    )
  )
  # C4 as array_record. The route a user can take: the public release's json.gz
  # shards through `python -m ir_jax.data c4 --src 'c4/en/c4-train.*.json.gz' --out DIR`,
  # which prints the data.name / data.data_dir to set here (docs/scaling.md, step 3).
  # The TFDS catalogue's c4/en below needs Apache Beam to build. The tokenizer
  # comes from model.checkpoint.
  cfg.data = ml_collections.ConfigDict(
    dict(
      name="c4/en",
      tokenizer="",  # '': the Llama-2 checkpoint's tokenizer.json
      seq_len=2048,
      batch_size=16,  # one sequence per chip of a v5e 4x4 slice
      data_dir="runs/tfds",
      text_field="text",
      train_split="train",
      eval_split="validation",
      seed=0,
      add_bos=None,
      add_eos=None,
      prefetch=2,
    )
  )
  # Reference budgets (train defaults): forecasters 2,000 steps of short rows
  # (the reference uses 4 x 128 tokens; 16 rows keep one per chip of a 4x4
  # slice), routers 2,000 steps of 16 x 2,048 tokens. Parameters and optimizer
  # state sharded over all chips (FSDP).
  cfg.train.forecaster.batch_size = 16
  cfg.train.forecaster.seq_len = 128
  cfg.mesh.data = 1
  cfg.mesh.fsdp = -1
  return cfg
