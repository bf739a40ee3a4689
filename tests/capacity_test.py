"""`CapacityTable` against hand-worked tables: its stored forms, mean, rescale and back-fill."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from routing_test import make_model

from ir_jax import fit
from ir_jax import routing as R
from ir_jax.config import ConfigError
from ir_jax.routing.capacity import (
  LATER_ROUTING_LEAVES,
  CapacityTable,
  backfill,
  mean_capacity,
  present,
)


def test_stored_forms_round_trip_and_absent_table():
  rows = ((1.0, 0.5), (0.25, 0.75), (0.5, 0.0))
  t = CapacityTable(rows)
  arr = t.to_array(3)
  assert arr.dtype == np.float32 and arr.shape == (3, 2)
  np.testing.assert_array_equal(arr, np.array(rows, np.float32))
  assert CapacityTable.from_array(arr) == t
  assert t.to_json() == [[1.0, 0.5], [0.25, 0.75], [0.5, 0.0]]
  assert CapacityTable.from_json(t.to_json()) == t
  # No table: -1 in the model state, null in routing.json, None in a spec.
  none = CapacityTable.from_array(np.full((3, 2), -1.0, np.float32))
  assert not none.is_present and none.rows is None and none.to_json() is None
  np.testing.assert_array_equal(none.to_array(3), np.full((3, 2), -1.0))
  assert CapacityTable.from_json(None) == none
  # One negative entry (a half-written table) is no table either.
  assert not CapacityTable.from_array(np.array([[1.0, -1.0]])).is_present
  assert bool(present(jnp.asarray(arr))) and not bool(present(jnp.asarray(none.to_array(3))))


def test_backfill_is_no_table_and_names_the_later_leaves():
  out = backfill((4, 2), np.float32)
  assert out.dtype == np.float32 and (out == -1.0).all()
  assert set(LATER_ROUTING_LEAVES) == {"capacity", "calibrated_for"}
  assert not CapacityTable.from_array(out).is_present


def test_mean_and_unit_sparsity_by_hand():
  rows = ((1.0, 0.5), (0.25, 0.75))
  t = CapacityTable(rows)
  assert t.mean(0.3) == pytest.approx((1.0 + 0.5 + 0.25 + 0.75) / 4)
  assert CapacityTable().mean(0.3) == 0.3
  attn, mlp = t.unit_sparsity()
  assert attn == pytest.approx(1 - (1.0 + 0.25) / 2) and mlp == pytest.approx(1 - 1.25 / 2)
  assert mean_capacity(R.RoutingSpec(sparsity=0.3)) == pytest.approx(0.7)
  assert mean_capacity(R.RoutingSpec(capacities=rows)) == pytest.approx(0.625)


def test_rescale_by_hand():
  # sparsities (0, 0.5, 0.5, 0.75), mean 0.4375; halved to mean 0.21875: every one halves.
  t = CapacityTable(((1.0, 0.5), (0.5, 0.25)))
  got = np.asarray(t.rescale(0.21875).rows)
  np.testing.assert_allclose(got, [[1.0, 0.75], [0.75, 0.625]], atol=1e-12)
  # Raised to mean 0.75 (total 3): x 12/7 takes 0.75 past 1, so it clips to 1 and the
  # two halves take the remaining 2 (x 2): sparsities (0, 1, 1, 1); the dense unit stays.
  got = np.asarray(t.rescale(0.75).rows)
  np.testing.assert_allclose(got, [[1.0, 0.0], [0.0, 0.0]], atol=1e-12)
  with pytest.raises(ConfigError, match="sparsity must be"):
    t.rescale(1.5)


def test_spec_routes_with_the_table_and_trained_spec_goes_through_it():
  rows = ((1.0, 0.5), (0.75, 0.75), (0.5, 1.0))
  spec = R.RoutingSpec(sparsity=0.25)
  assert CapacityTable().spec(spec) is spec
  assert CapacityTable(rows).spec(spec).capacities == rows
  m = make_model()
  assert R.trained_spec(m, spec) is spec  # a fresh model has no table
  m.routing.capacity[...] = jnp.asarray(CapacityTable(rows).to_array(3))
  assert CapacityTable.from_model(m) == CapacityTable(rows)
  # The table's own mean sparsity is 0.25: trained_spec routes with the table itself.
  np.testing.assert_allclose(np.asarray(R.trained_spec(m, spec).capacities), rows, atol=1e-12)


def test_allocation_entry_points_are_the_fit_names():
  assert fit.allocate is R.capacity.allocate
  assert fit.allocate_curves is R.capacity.allocate_curves
  # Hand example: two units, damage 1 and 4 at level 0.5; mean sparsity 0.25 goes where
  # d (s / 0.5)^2 rises least: with step 1/4 the first increment goes to the cheaper unit.
  caps = R.capacity.allocate(np.array([[1.0, 4.0]]), 0.25, level=0.5, step=0.25)
  np.testing.assert_allclose(caps, [[0.5, 1.0]])
