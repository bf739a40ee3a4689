"""The conversion error class, in a leaf module so every converter can raise it."""

from ir_jax.base_error import IrJaxError


class WeightImportError(IrJaxError, ValueError):
  """A weight source is missing a piece or disagrees with its config."""
