"""ir_jax: informed routing for Llama-family LLMs in JAX / Flax NNX."""

from ir_jax.api import load_model
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.model import Llama
from ir_jax.routing import RoutingSpec

__all__ = ["ConfigError", "Llama", "LlamaConfig", "load_model", "RoutingSpec"]
__version__ = "0.1.0"
