"""ir_jax.attention (query chunks, each against its key prefix) against a float64 numpy loop.

Small chunks and key blocks so every case runs several chunks and several prefix
lengths: dense causal rows, packed segments with padding, gathered (sorted
subset) queries, keys in any order, a decode step against a cache; gradients
against the one-shot masked softmax's autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir_jax.attention import _chunks, attention


def numpy_attention(q, k, v, qi, ki, qs=None, ks=None):
  """Reference: float64, query by query, head by head."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, s, h, kd = q.shape
  n = k.shape[2]
  out = np.zeros((b, s, h, kd))
  for bi in range(b):
    for si in range(s):
      ok = np.asarray(ki[bi]) <= qi[bi, si]
      if qs is not None:
        ok &= np.asarray(ks[bi]) == qs[bi, si]
      for hi in range(h):
        logits = k[bi, :, hi // (h // n)] @ q[bi, si, hi] / np.sqrt(kd)
        logits = np.where(ok, logits, -np.inf)
        p = np.exp(logits - logits.max())
        out[bi, si, hi] = (p / p.sum()) @ v[bi, :, hi // (h // n)]
  return out


def _qkv(rng, b, s, t, h=4, n=2, kd=8):
  q = rng.normal(size=(b, s, h, kd)).astype(np.float32)
  k = rng.normal(size=(b, t, n, kd)).astype(np.float32)
  v = rng.normal(size=(b, t, n, kd)).astype(np.float32)
  return q, k, v


def _run(q, k, v, qi, ki, qs=None, ks=None, chunk=16, block=8):
  f = jax.jit(
    lambda *a: attention(*a[:5], *a[5:], chunk=chunk, block=block),
  )
  args = [jnp.asarray(a) for a in (q, k, v, qi, ki)]
  if qs is not None:
    args += [jnp.asarray(qs), jnp.asarray(ks)]
  return np.asarray(f(*args))


def test_dense_causal_rows_several_chunks():
  rng = np.random.default_rng(0)
  b, t = 2, 50  # chunks of 16 (padded to 4 x 16 = 64 queries), key prefixes 8, 16, ..., 50
  q, k, v = _qkv(rng, b, t, t)
  idx = np.broadcast_to(np.arange(t), (b, t))
  got = _run(q, k, v, idx, idx)
  np.testing.assert_allclose(got, numpy_attention(q, k, v, idx, idx), rtol=2e-5, atol=2e-6)


def test_packed_segments_and_padding():
  rng = np.random.default_rng(1)
  t = 40
  q, k, v = _qkv(rng, 2, t, t)
  idx = np.broadcast_to(np.arange(t), (2, t))
  seg = np.array([[1] * 13 + [2] * 20 + [0] * 7, [3] * 40])
  got = _run(q, k, v, idx, idx, seg, seg)
  want = numpy_attention(q, k, v, idx, idx, seg, seg)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_gathered_queries_see_keys_by_original_index():
  """A routed unit's queries: a sorted subset of the row, attending every key up to their
  own original index (rows differ, so each chunk's prefix is the longest any row needs)."""
  rng = np.random.default_rng(2)
  t, s = 64, 24
  q, k, v = _qkv(rng, 2, s, t)
  qi = np.stack([np.sort(rng.choice(t, s, replace=False)) for _ in range(2)])
  ki = np.broadcast_to(np.arange(t), (2, t))
  seg = np.stack([np.repeat([1, 2], [30, 34]), np.repeat([5, 6, 0], [10, 44, 10])])
  qs = np.take_along_axis(seg, qi, 1)
  got = _run(q, k, v, qi, ki, qs, seg)
  want = numpy_attention(q, k, v, qi, ki, qs, seg)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_keys_in_any_order():
  """The prefix a chunk needs is read from where its visible keys sit, not from an order."""
  rng = np.random.default_rng(3)
  t = 40
  q, k, v = _qkv(rng, 1, t, t)
  qi = np.arange(t)[None]
  ki = rng.permutation(t)[None]
  got = _run(q, k, v, qi, ki)
  np.testing.assert_allclose(got, numpy_attention(q, k, v, qi, ki), rtol=2e-5, atol=2e-6)


def test_decode_step_against_a_cache():
  """One query at position p against a cache of T slots; what the slots after p hold
  must not leak in (large values: masked keys get probability exactly 0)."""
  rng = np.random.default_rng(4)
  t = 64
  q, k, v = _qkv(rng, 3, 1, t)
  k[:, 20:] = 1e4  # unwritten slots
  v[:, 20:] = -1e4
  qi = np.full((3, 1), 19)
  ki = np.broadcast_to(np.arange(t), (3, t))
  got = _run(q, k, v, qi, ki)
  want = numpy_attention(q, k[:, :20], v[:, :20], qi, ki[:, :20])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def _one_shot(q, k, v, qi, ki, qs, ks):
  """The masked softmax over all keys at once (what the model computed before)."""
  b, s, h, kd = q.shape
  n = k.shape[2]
  q5 = q.reshape(b, s, n, h // n, kd)
  logits = jnp.einsum("bsngk,btnk->bngst", q5, k, preferred_element_type=jnp.float32)
  mask = (ki[:, None, :] <= qi[:, :, None]) & (qs[:, :, None] == ks[:, None, :])
  logits = jnp.where(mask[:, None, None], logits / np.sqrt(kd), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bngst,btnk->bsngk", probs, v).reshape(b, s, h, kd)


def test_gradients_match_one_shot_softmax():
  rng = np.random.default_rng(5)
  t = 40
  q, k, v = (jnp.asarray(a) for a in _qkv(rng, 2, t, t))
  idx = jnp.broadcast_to(jnp.arange(t), (2, t))
  seg = jnp.asarray(np.array([[1] * 25 + [2] * 15, [1] * 33 + [0] * 7]))
  w = jnp.asarray(rng.normal(size=(2, t, 4, 8)).astype(np.float32))

  def loss(fn):
    return lambda q, k, v: jnp.sum(w * fn(q, k, v))

  chunked = lambda q, k, v: attention(q, k, v, idx, idx, seg, seg, chunk=16, block=8)
  shot = lambda q, k, v: _one_shot(q, k, v, idx, idx, seg, seg)
  got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(shot), argnums=(0, 1, 2))(q, k, v)
  for g, w_ in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "s,chunk,want", [(5, 16, (1, 5)), (50, 16, (4, 16)), (1000, 512, (2, 504))]
)
def test_chunks_cover_the_queries(s, chunk, want):
  assert _chunks(s, chunk) == want
