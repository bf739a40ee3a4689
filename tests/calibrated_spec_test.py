"""The trained table is the default route: what a causal spec is told when its thresholds
do not fit it (routing.check_calibrated), on a hand-made table.

What is checked against what:
  the refusal   per-unit-type sparsities in the message vs the table written by hand
                (attention 0.0, MLP 0.8 in every layer: mean 0.4, as a uniform 0.4 spec)
  the way out   routing.trained_spec of the same spec routes, and executes the table
  one rule      the full forward, the decoder and ir_jax.generate's path refuse alike
"""

from __future__ import annotations

import numpy as np
import pytest
from routing_test import CFG, make_model, tokens

from ir_jax import routing as R
from ir_jax.config import ConfigError

# Every layer: attention always executes, MLP executes 20% of tokens (sparsity 0.8).
TABLE = tuple((1.0, 0.2) for _ in range(CFG.num_layers))


@pytest.fixture(scope="module")
def trained():
  """A model with TABLE stored as its trained table and thresholds calibrated for it."""
  m = make_model()
  m.routing.capacity[...] = np.asarray(TABLE, np.float32)
  spec = R.trained_spec(m, R.RoutingSpec(policy="informed", sparsity=0.4, mode="causal"))
  np.testing.assert_allclose(spec.capacities, TABLE, rtol=0, atol=1e-6)  # the table itself
  R.calibrate_thresholds(m, [tokens(4, 32, 3)], spec)
  return m


def test_a_uniform_spec_at_the_tables_mean_is_told_to_route_with_the_table(trained):
  spec = R.RoutingSpec(policy="informed", sparsity=0.4, mode="causal")
  with pytest.raises(ConfigError) as e:
    trained(tokens(1, 12), routing=spec)
  msg = str(e.value)
  assert "\n" not in msg
  assert "a uniform sparsity 0.400 on every unit" in msg
  # the table's shape, not two equal means: what the thresholds fit per unit type
  assert "trained per-unit capacity table, mean sparsity 0.400 (attention 0.000, MLP 0.800)" in msg
  assert "mean sparsity is the table's" in msg
  assert "ir_jax.routing.trained_spec(model, spec)" in msg
  # the named way out routes, executing the table on these tokens' MLPs (causal
  # thresholds: about 20%, not exactly) and every attention unit
  _, aux = trained(tokens(4, 32, 3), routing=R.trained_spec(trained, spec), return_aux=True)
  rate = np.asarray(aux["exec_rate"])
  np.testing.assert_allclose(rate[:, 0], 1.0)
  np.testing.assert_allclose(rate[:, 1], 0.2, atol=0.05)


def test_another_sparsity_is_told_that_the_moved_table_needs_calibrating(trained):
  spec = R.RoutingSpec(policy="informed", sparsity=0.25, mode="causal")
  with pytest.raises(ConfigError) as e:
    trained(tokens(1, 12), routing=spec)
  msg = str(e.value)
  assert "a uniform sparsity 0.250 on every unit" in msg
  assert "mean sparsity 0.400 (attention 0.000, MLP 0.800)" in msg
  assert "routes with the table moved to this sparsity" in msg
  assert "calibrate_thresholds" in msg


def test_every_causal_entry_point_gives_the_same_refusal(trained):
  spec = R.RoutingSpec(policy="informed", sparsity=0.4, mode="causal")
  messages = []
  for call in (
    lambda: trained(tokens(1, 6), routing=spec),
    lambda: R.generate(trained, tokens(1, 3), 2, spec),
    lambda: R.check_calibrated(trained, spec),
  ):
    with pytest.raises(ConfigError) as e:
      call()
    messages.append(str(e.value))
  assert len(set(messages)) == 1, messages


def test_a_never_calibrated_model_says_so():
  m = make_model()
  spec = R.RoutingSpec(policy="informed", sparsity=0.5, mode="causal")
  with pytest.raises(ConfigError, match="never calibrated; calibrate them for this spec first"):
    m(tokens(1, 6), routing=spec)
