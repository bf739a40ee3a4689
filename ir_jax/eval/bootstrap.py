"""The paired document bootstrap, importable from here too: it lives in `ir_jax.bootstrap`
(statistics below both training's held-out evaluation and `ir_jax.eval`)."""

from ir_jax.bootstrap import DRAWS, DocumentTally, ratio_interval  # noqa: F401
