"""The conversion error class, in a leaf module so every converter can raise it."""


class WeightImportError(ValueError):
  """A weight source is missing a piece or disagrees with its config."""
