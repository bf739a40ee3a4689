"""Evaluation of routed models: quality under data shift (see ir_jax.eval.estimators)."""
