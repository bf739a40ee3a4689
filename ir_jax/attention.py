"""Softmax attention in query chunks, each against the keys its causal mask can reach.

Shapes as in `ir_jax.model`: B batch, S queries (all tokens, or a gathered
subset keeping their original indices), T keys, H query heads, N kv heads,
G = H // N, K head dim; C a chunk of queries, L a prefix of the keys.

`attention` never holds a `[S, T]` score matrix: queries run in chunks of
`QUERY_CHUNK` (a `lax.map`), and each chunk attends only the shortest prefix
of the keys, in steps of `KEY_BLOCK` (or T / `MAX_PREFIXES`), that holds every
key its mask allows (`lax.switch` over the static prefix lengths; the choice is
read from the indices, so gathered queries of a routed unit skip what they
cannot see just as dense ones do). A key outside the prefix is masked for every query of the
chunk, so the result is the one-shot masked softmax, value for value. The
mask (causal by original index, same segment) is built per chunk from the
indices, never as a `[B, S, T]` array. Memory is O(C x T) per layer.

The gradient (`jax.custom_vjp`) recomputes each chunk's scores in the
backward pass from the saved inputs (as flash attention does), so training
stores no probabilities either.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

QUERY_CHUNK = 512  # queries per chunk: the scores held at once are [B, H, C, <= T]
KEY_BLOCK = 512  # granularity of the key prefix a chunk attends
MAX_PREFIXES = 8  # at most this many prefix lengths (switch branches: each one is compiled)


def attention_mask(
  q_index_BxS: Array, k_index_BxT: Array, q_segment_BxS: Array | None, k_segment_BxT: Array | None
) -> Array:
  """Causal (by original index) and same-segment mask `[B, S, T]`."""
  mask = k_index_BxT[:, None, :] <= q_index_BxS[:, :, None]
  if q_segment_BxS is not None:
    mask &= q_segment_BxS[:, :, None] == k_segment_BxT[:, None, :]
  return mask


def _core(q_BxCxNxGxK, k_BxLxNxK, v_BxLxNxK, mask_BxCxL, dtype) -> Array:
  """One-shot masked softmax attention `[B, C, N, G, K]` (float32 scores, probabilities
  cast to `dtype` before the values)."""
  b, c, n, g, kd = q_BxCxNxGxK.shape
  el = k_BxLxNxK.shape[1]
  # Both matmuls as plain batched matmuls over (B, N) with the G query heads of a KV head
  # and the C queries merged into one row dimension M = G x C: XLA's CPU backend runs
  # these 1.5-2.5x faster than the same einsums with G and C as separate dimensions
  # (docs/performance.md), and the numbers are the same contractions over K and L.
  q_BxNxMxK = jnp.transpose(q_BxCxNxGxK, (0, 2, 3, 1, 4)).reshape(b, n, g * c, kd)
  k_BxNxLxK = jnp.transpose(k_BxLxNxK, (0, 2, 1, 3))
  v_BxNxLxK = jnp.transpose(v_BxLxNxK, (0, 2, 1, 3))
  logits_BxNxMxL = jnp.einsum(
    "bnmk,bnlk->bnml", q_BxNxMxK, k_BxNxLxK, preferred_element_type=jnp.float32
  )
  logits_BxNxGxCxL = logits_BxNxMxL.reshape(b, n, g, c, el) / math.sqrt(kd)
  big_neg = jnp.finfo(jnp.float32).min
  logits_BxNxGxCxL = jnp.where(mask_BxCxL[:, None, None], logits_BxNxGxCxL, big_neg)
  probs = jax.nn.softmax(logits_BxNxGxCxL, axis=-1).astype(dtype)
  o_BxNxMxK = jnp.einsum("bnml,bnlk->bnmk", probs.reshape(b, n, g * c, el), v_BxNxLxK)
  return jnp.transpose(o_BxNxMxK.reshape(b, n, g, c, kd), (0, 3, 1, 2, 4))


def _prefixes(t: int, block: int) -> np.ndarray:
  """The key prefix lengths a chunk may attend: multiples of `block` (coarser for long
  keys, so that there are at most MAX_PREFIXES), the last one all T keys."""
  block = max(block, -(-t // MAX_PREFIXES))
  return np.unique(np.minimum(np.arange(1, -(-t // block) + 1) * block, t))


def _prefix_branch(q_index_BxC: Array, kv_index_BxT: Array, lengths: np.ndarray) -> Array:
  """Index into `lengths` of the shortest key prefix that holds every key some query of
  the chunk may attend (for any key order: every key after it is masked for all)."""
  t = kv_index_BxT.shape[1]
  qmax_B = jnp.max(q_index_BxC, axis=1)
  seen = kv_index_BxT <= qmax_B[:, None]
  need = 1 + jnp.max(jnp.where(seen, jnp.arange(t), -1))
  return jnp.sum(jnp.asarray(lengths) < need).astype(jnp.int32)


def _chunks(s: int, chunk: int) -> tuple[int, int]:
  """(number of chunks, chunk length): even chunks of at most ~`chunk`, multiples of 8."""
  if s <= chunk:
    return 1, s
  n = -(-s // chunk)
  per = -(-s // n)
  c = -(-per // 8) * 8
  return -(-s // c), c


def _split(a: Array | None, n: int, c: int, fill: int) -> Array | None:
  """`[B, S, ...]` -> `[n, B, c, ...]`, padded along S with `fill`."""
  if a is None:
    return None
  pad = n * c - a.shape[1]
  if pad:
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
    a = jnp.pad(a, widths, constant_values=fill)
  return jnp.moveaxis(a.reshape(a.shape[0], n, c, *a.shape[2:]), 1, 0)


def _merge(a: Array, s: int) -> Array:
  """`[n, B, c, ...]` -> `[B, S, ...]`."""
  a = jnp.moveaxis(a, 0, 1)
  return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :s]


def _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, dtype, chunk, block):
  b, s, h, kd = q.shape
  t, n = k.shape[1], k.shape[2]
  lengths = _prefixes(t, block)

  def one(q_BxCxNxGxK, qi_BxC, qs_BxC):
    def at(length: int) -> Array:
      ks = None if kv_seg is None else kv_seg[:, :length]
      m = attention_mask(qi_BxC, kv_index[:, :length], qs_BxC, ks)
      return _core(q_BxCxNxGxK, k[:, :length], v[:, :length], m, dtype)

    if len(lengths) == 1:
      return at(int(lengths[0]))
    branch = _prefix_branch(qi_BxC, kv_index, lengths)
    return jax.lax.switch(branch, [functools.partial(at, int(x)) for x in lengths])

  q5 = q.reshape(b, s, n, h // n, kd)
  nc, c = _chunks(s, chunk)
  if nc == 1:
    o = one(q5, q_index, q_seg)
  else:  # padded queries carry index -1: they see no key, and are cut off below
    xs = (_split(q5, nc, c, 0), _split(q_index, nc, c, -1), _split(q_seg, nc, c, -1))
    o = _merge(jax.lax.map(lambda x: one(*x), xs), s)
  return o.reshape(b, s, h, kd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, q_index, kv_index, q_seg, kv_seg, dtype, chunk, block):
  return _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, dtype, chunk, block)


def _attention_fwd(q, k, v, q_index, kv_index, q_seg, kv_seg, dtype, chunk, block):
  out = _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, dtype, chunk, block)
  return out, (q, k, v, q_index, kv_index, q_seg, kv_seg)


def _attention_bwd(dtype, chunk, block, res, do_BxSxHxK):
  """Per chunk: the vjp of its one-shot attention over its key prefix (scores recomputed);
  key and value gradients summed over chunks in float32."""
  q, k, v, q_index, kv_index, q_seg, kv_seg = res
  b, s, h, kd = q.shape
  t, n = k.shape[1], k.shape[2]
  lengths = _prefixes(t, block)
  f32 = jnp.float32

  def one(carry, x):
    dk_acc, dv_acc = carry
    q_BxCxNxGxK, qi_BxC, qs_BxC, do_BxCxNxGxK = x

    def at(length: int):
      ks = None if kv_seg is None else kv_seg[:, :length]
      m = attention_mask(qi_BxC, kv_index[:, :length], qs_BxC, ks)
      _, vjp = jax.vjp(
        lambda qq, kk, vv: _core(qq, kk, vv, m, dtype), q_BxCxNxGxK, k[:, :length], v[:, :length]
      )
      dq, dk, dv = vjp(do_BxCxNxGxK.astype(dtype))
      pad = [(0, 0), (0, t - length), (0, 0), (0, 0)]
      return dq.astype(f32), jnp.pad(dk.astype(f32), pad), jnp.pad(dv.astype(f32), pad)

    if len(lengths) == 1:
      dq, dk, dv = at(int(lengths[0]))
    else:
      branch = _prefix_branch(qi_BxC, kv_index, lengths)
      dq, dk, dv = jax.lax.switch(branch, [functools.partial(at, int(x)) for x in lengths])
    return (dk_acc + dk, dv_acc + dv), dq

  q5 = q.reshape(b, s, n, h // n, kd)
  do5 = do_BxSxHxK.reshape(b, s, n, h // n, kd)
  nc, c = _chunks(s, chunk)
  zeros = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
  if nc == 1:
    (dk, dv), dq = one(zeros, (q5, q_index, q_seg, do5))
  else:
    xs = (
      _split(q5, nc, c, 0),
      _split(q_index, nc, c, -1),
      _split(q_seg, nc, c, -1),
      _split(do5, nc, c, 0),
    )
    (dk, dv), dq = jax.lax.scan(one, zeros, xs)
    dq = _merge(dq, s)
  dq = dq.reshape(b, s, h, kd).astype(q.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
  q_BxSxHxK: Array,
  k_BxTxNxK: Array,
  v_BxTxNxK: Array,
  q_index_BxS: Array,
  kv_index_BxT: Array,
  q_segment_BxS: Array | None = None,
  kv_segment_BxT: Array | None = None,
  *,
  dtype=None,
  chunk: int = QUERY_CHUNK,
  block: int = KEY_BLOCK,
) -> Array:
  """Grouped-query softmax attention `[B, S, H, K]`: query s attends key t iff
  `kv_index[t] <= q_index[s]` and (with segments) their segment ids are equal.

  Scores in float32, probabilities cast to `dtype` (default the queries') before the
  values; the same numbers as one masked softmax over all keys (see the module doc).
  Every query must see at least one key (its own, in every caller).
  """
  dtype = jnp.dtype(q_BxSxHxK.dtype if dtype is None else dtype)
  if (q_segment_BxS is None) != (kv_segment_BxT is None):
    raise ValueError("attention: pass segment ids for both queries and keys, or for neither")
  return _attention(
    q_BxSxHxK,
    k_BxTxNxK,
    v_BxTxNxK,
    q_index_BxS.astype(jnp.int32),
    kv_index_BxT.astype(jnp.int32),
    q_segment_BxS,
    kv_segment_BxT,
    dtype,
    chunk,
    block,
  )
