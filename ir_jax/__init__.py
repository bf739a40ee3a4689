"""ir_jax: informed routing for Llama-family LLMs in JAX / Flax NNX.

The public names load on first use (PEP 562), so `import ir_jax` and
`python -m ir_jax.X --help` do not pay for importing JAX up front.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from ir_jax.api import load_model
  from ir_jax.config import ConfigError, LlamaConfig
  from ir_jax.model import Llama
  from ir_jax.routing import RoutingSpec

# public name -> the module that defines it
_LAZY = {
  "ConfigError": "ir_jax.config",
  "Llama": "ir_jax.model",
  "LlamaConfig": "ir_jax.config",
  "load_model": "ir_jax.api",
  "RoutingSpec": "ir_jax.routing",
}

__all__ = ["ConfigError", "Llama", "LlamaConfig", "load_model", "RoutingSpec"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
  elif not name.startswith("__") and importlib.util.find_spec(f"ir_jax.{name}") is not None:
    # `import ir_jax; ir_jax.model.X` kept working when the package imported eagerly
    value = importlib.import_module(f"ir_jax.{name}")
  else:
    raise AttributeError(f"module 'ir_jax' has no attribute {name!r}")
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
