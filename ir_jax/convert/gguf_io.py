"""The validating GGUF reader, importable from here too: it lives in `ir_jax.gguf_io`,
below both `ir_jax.convert` and `ir_jax.tokenizer`, which read GGUF files."""

from ir_jax.gguf_io import (  # noqa: F401
  MAX_ARRAY,
  MAX_DIMS,
  MAX_KEY,
  MAX_NESTING,
  Field,
  GGUFError,
  GGUFFile,
  Tensor,
)
