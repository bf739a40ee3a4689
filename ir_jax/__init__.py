"""ir_jax: informed routing for Llama-family LLMs in JAX / Flax NNX."""

from ir_jax.api import load_model
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.model import Llama

__all__ = ["ConfigError", "Llama", "LlamaConfig", "load_model"]
__version__ = "0.1.0"
