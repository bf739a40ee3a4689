"""A Llama decoder in Flax NNX with HuggingFace parameter layout.

Shapes use suffixes: B batch, T sequence, S a (possibly gathered) subset of
the sequence, D hidden, H query heads, N kv heads, G = H // N, K head dim,
F mlp width, V vocab, L layers.

Every parameter carries logical axis names (`out_sharding` metadata) from
AXES below; `ir_jax.sharding` maps them to mesh axes with one rules table.
Kernels are HF weights transposed (and split per head for attention), so
conversion is a rename, a transpose and a reshape.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax import forecast
from ir_jax.attention import attention
from ir_jax.config import LlamaConfig
from ir_jax.sharding import constrain

Array = jax.Array


# Logical axis names used on parameters (and BATCH, ACT_EMBED on activations).
class Ax:
  EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS, LORA = (
    "embed",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "vocab",
    "layers",
    "lora",
  )
  BATCH, ACT_EMBED = "batch", "act_embed"


# Activation layouts (no-ops without a mesh; see ir_jax.sharding.constrain).
BxTxD = (Ax.BATCH, None, Ax.ACT_EMBED)
BxTxV = (Ax.BATCH, None, Ax.VOCAB)


class LoraParam(nnx.Param):
  """Parameters of a LoRA adapter (trained by the `lora` stage only)."""


# Everything a training run produces on top of the base weights (forecasters, routers,
# thresholds, capacity tables, calibration records, LoRA): what a run's checkpoints hold.
ADAPTERS = nnx.Any(
  forecast.ForecasterParam,
  forecast.RouterParam,
  forecast.Threshold,
  forecast.Capacity,
  forecast.CalibratedFor,
  LoraParam,
)


def _param(
  rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any, init: str = "normal"
) -> nnx.Param:
  if init == "ones":
    value = jnp.ones(shape, dtype)
  else:  # HF Llama initialises linear and embedding weights N(0, 0.02)
    value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class LoRA(nnx.Module):
  """Low-rank update of a projection: scale * (n @ A) @ B, with B = 0 at init.

  `out_shape` / `out_axes` are the projection's output dims (e.g. heads x
  head_dim), so the update has the projection's own layout.
  """

  def __init__(
    self, cfg: LlamaConfig, out_shape: tuple[int, ...], out_axes: tuple[str, ...], rngs: nnx.Rngs
  ):
    d, r, dt = cfg.hidden_size, cfg.lora_rank, cfg.weight_dtype
    a = jax.random.normal(rngs.params(), (d, r), jnp.float32) / math.sqrt(d)
    self.a = LoraParam(a.astype(dt), out_sharding=(Ax.EMBED, Ax.LORA), eager_sharding=False)
    self.b = LoraParam(
      jnp.zeros((r, *out_shape), dt), out_sharding=(Ax.LORA, *out_axes), eager_sharding=False
    )
    self.scale = cfg.lora_scale
    self.dtype = cfg.compute_dtype

  def __call__(self, n_BxSxD: Array) -> Array:
    h_BxSxR = n_BxSxD @ self.a[...].astype(self.dtype)
    b = self.b[...].astype(self.dtype)
    return self.scale * jnp.tensordot(h_BxSxR, b, axes=1)


# --------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies `[K/2]` (float64 numpy; a trace-time constant)."""
  k = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float64) / k))
  kind = cfg.rope_type
  if kind == "linear":
    inv = inv / cfg.rope_scaling["factor"]
  elif kind == "llama3":
    scaling = cfg.rope_scaling
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
    # Long wavelengths are stretched by `factor`, short ones kept; between
    # the two bands the frequencies are blended linearly in 1/wavelength.
    scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    inv = np.where(mid, blended, scaled)
  return inv.astype(np.float32)


def apply_rope(x_BxTxHxK: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
  """Rotate-half RoPE at explicit positions (gathered tokens keep theirs)."""
  freqs_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  freqs_BxTxK = jnp.concatenate([freqs_BxTxK2, freqs_BxTxK2], axis=-1)
  cos = jnp.cos(freqs_BxTxK)[:, :, None, :]
  sin = jnp.sin(freqs_BxTxK)[:, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxTxHxK.dtype)


# ------------------------------------------------------------------ modules
class RMSNorm(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.weight = _param(rngs, (cfg.hidden_size,), (Ax.EMBED,), cfg.weight_dtype, "ones")
    self.eps = cfg.rms_norm_eps
    self.dtype = cfg.compute_dtype

  def __call__(self, x_BxTxD: Array) -> Array:
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...].astype(jnp.float32) * x).astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query attention, split so a router can feed queries for a subset."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, h, n, k, dt = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.weight_dtype,
    )
    self.q_proj = _param(rngs, (d, h, k), (Ax.EMBED, Ax.HEADS, Ax.HEAD_DIM), dt)
    self.k_proj = _param(rngs, (d, n, k), (Ax.EMBED, Ax.KV_HEADS, Ax.HEAD_DIM), dt)
    self.v_proj = _param(rngs, (d, n, k), (Ax.EMBED, Ax.KV_HEADS, Ax.HEAD_DIM), dt)
    self.o_proj = _param(rngs, (h, k, d), (Ax.HEADS, Ax.HEAD_DIM, Ax.EMBED), dt)
    if cfg.lora_rank:
      self.q_lora = LoRA(cfg, (h, k), (Ax.HEADS, Ax.HEAD_DIM), rngs)
      self.v_lora = LoRA(cfg, (n, k), (Ax.KV_HEADS, Ax.HEAD_DIM), rngs)
    self.config = cfg  # static: inv_freq is recomputed at trace time, never stored as state
    self.dtype = cfg.compute_dtype

  def _w(self, p: nnx.Param) -> Array:
    return p[...].astype(self.dtype)

  def keys_values(self, n_BxTxD: Array, positions_BxT: Array) -> tuple[Array, Array]:
    k_BxTxNxK = jnp.einsum("btd,dnk->btnk", n_BxTxD, self._w(self.k_proj))
    v_BxTxNxK = jnp.einsum("btd,dnk->btnk", n_BxTxD, self._w(self.v_proj))
    if self.config.lora_rank:
      v_BxTxNxK = v_BxTxNxK + self.v_lora(n_BxTxD)
    return apply_rope(k_BxTxNxK, positions_BxT, rope_inv_freq(self.config)), v_BxTxNxK

  def queries(self, n_BxSxD: Array, positions_BxS: Array) -> Array:
    q_BxSxHxK = jnp.einsum("bsd,dhk->bshk", n_BxSxD, self._w(self.q_proj))
    if self.config.lora_rank:
      q_BxSxHxK = q_BxSxHxK + self.q_lora(n_BxSxD)
    return apply_rope(q_BxSxHxK, positions_BxS, rope_inv_freq(self.config))

  def attend(
    self,
    q_BxSxHxK: Array,
    k_BxTxNxK: Array,
    v_BxTxNxK: Array,
    q_index_BxS: Array,
    kv_index_BxT: Array,
    q_segment_BxS: Array | None = None,
    kv_segment_BxT: Array | None = None,
  ) -> Array:
    """Softmax attention (causal by index, within segments; `ir_jax.attention`, which never
    holds the `[S, T]` scores) and the output projection; returns `[B, S, D]`."""
    o_BxSxHxK = attention(
      q_BxSxHxK,
      k_BxTxNxK,
      v_BxTxNxK,
      q_index_BxS,
      kv_index_BxT,
      q_segment_BxS,
      kv_segment_BxT,
      dtype=self.dtype,
    )
    return jnp.einsum("bshk,hkd->bsd", o_BxSxHxK, self._w(self.o_proj))

  def __call__(
    self, n_BxTxD: Array, positions_BxT: Array, index_BxT: Array, segment_ids_BxT: Array | None
  ) -> Array:
    k, v = self.keys_values(n_BxTxD, positions_BxT)
    q = self.queries(n_BxTxD, positions_BxT)
    return self.attend(q, k, v, index_BxT, index_BxT, segment_ids_BxT, segment_ids_BxT)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(n)) * up(n))."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
    self.gate_proj = _param(rngs, (d, f), (Ax.EMBED, Ax.MLP), dt)
    self.up_proj = _param(rngs, (d, f), (Ax.EMBED, Ax.MLP), dt)
    self.down_proj = _param(rngs, (f, d), (Ax.MLP, Ax.EMBED), dt)
    if cfg.lora_rank:
      self.gate_lora = LoRA(cfg, (f,), (Ax.MLP,), rngs)
    self.lora = bool(cfg.lora_rank)
    self.dtype = cfg.compute_dtype

  def __call__(self, n_BxSxD: Array) -> Array:
    w = lambda p: p[...].astype(self.dtype)
    gate_BxSxF = n_BxSxD @ w(self.gate_proj)
    if self.lora:
      gate_BxSxF = gate_BxSxF + self.gate_lora(n_BxSxD)
    h_BxSxF = jax.nn.silu(gate_BxSxF) * (n_BxSxD @ w(self.up_proj))
    return h_BxSxF @ w(self.down_proj)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg, rngs)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(
    self, x_BxTxD: Array, positions_BxT: Array, index_BxT: Array, segment_ids_BxT: Array | None
  ) -> Array:
    n = self.input_layernorm(x_BxTxD)
    x_BxTxD = x_BxTxD + self.self_attn(n, positions_BxT, index_BxT, segment_ids_BxT)
    return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))


def _stacked_layers(cfg: LlamaConfig, rngs: nnx.Rngs) -> DecoderLayer:
  """All decoder layers as one module whose parameters lead with a `layers` axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: Ax.LAYERS})
  def create(r: nnx.Rngs) -> DecoderLayer:
    return DecoderLayer(cfg, r)

  return create(rngs)


class Llama(nnx.Module):
  """Llama causal LM: `model(tokens_BxT) -> logits_BxTxV` (float32)."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.config = cfg
    self.embed_tokens = _param(
      rngs, (cfg.vocab_size, cfg.hidden_size), (Ax.VOCAB, Ax.EMBED), cfg.weight_dtype
    )
    self.layers = _stacked_layers(cfg, rngs)
    self.norm = RMSNorm(cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(
        rngs, (cfg.hidden_size, cfg.vocab_size), (Ax.EMBED, Ax.VOCAB), cfg.weight_dtype
      )
    # Forecasters, routers and thresholds for every unit, stacked like `layers`.
    self.routing = forecast.routing_stack(cfg, rngs)

  # -------------------------------------------------------------- pieces
  def embed(self, tokens_BxT: Array) -> Array:
    x = jnp.take(self.embed_tokens[...], tokens_BxT, axis=0).astype(self.config.compute_dtype)
    return constrain(x, BxTxD)

  def logits(self, x_BxTxD: Array) -> Array:
    h = constrain(self.norm(constrain(x_BxTxD, BxTxD)), BxTxD)
    if self.config.tie_word_embeddings:
      w_VxD = self.embed_tokens[...].astype(h.dtype)
      out = jnp.einsum("btd,vd->btv", h, w_VxD, preferred_element_type=jnp.float32)
    else:
      w_DxV = self.lm_head[...].astype(h.dtype)
      out = jnp.einsum("btd,dv->btv", h, w_DxV, preferred_element_type=jnp.float32)
    return constrain(out, BxTxV)

  def run_layers(
    self, layer_fn, x_BxTxD: Array, per_layer: Any = None, scan: bool | None = None
  ) -> tuple[Array, Any]:
    """Applies `layer_fn(layer, routing_layer, x, per_layer_slice) -> (x, aux)` over layers.

    Scanned (one compiled body, fast compile) or unrolled (`scan=False`, or
    the config's `scan_layers=False`); `per_layer` is an optional pytree with
    a leading layers axis, sliced alongside. In the unrolled form numpy leaves
    of `per_layer` stay static (per-layer shapes are possible). Returns the
    final x and the per-layer `aux` stacked on a leading layers axis.
    """
    scan = self.config.scan_layers if scan is None else scan
    graphdef, state = nnx.split(self.layers)
    rgraphdef, rstate = nnx.split(self.routing)

    def apply(x, layer_state, routing_state, extra):
      # `extra` is closed over, never a remat argument, so its static leaves stay static.
      def f(x, layer_state, routing_state):
        x, aux = layer_fn(
          nnx.merge(graphdef, layer_state),
          nnx.merge(rgraphdef, routing_state),
          constrain(x, BxTxD),
          extra,
        )
        return constrain(x, BxTxD), aux

      if self.config.remat:
        f = jax.checkpoint(f, prevent_cse=not scan)
      return f(x, layer_state, routing_state)

    if scan:
      return jax.lax.scan(lambda x, xs: apply(x, *xs), x_BxTxD, (state, rstate, per_layer))
    auxes = []
    for i in range(self.config.num_layers):
      sl = lambda a: a[i]
      x_BxTxD, aux = apply(
        x_BxTxD, jax.tree.map(sl, state), jax.tree.map(sl, rstate), jax.tree.map(sl, per_layer)
      )
      auxes.append(aux)
    return x_BxTxD, jax.tree.map(lambda *a: jnp.stack(a), *auxes)

  # ------------------------------------------------------------- forward
  def __call__(
    self,
    tokens_BxT: Array,
    positions_BxT: Array | None = None,
    segment_ids_BxT: Array | None = None,
    routing: Any = None,
    *,
    rng: Array | None = None,
    return_aux: bool = False,
  ) -> Any:
    """Logits `[B, T, V]` (float32) for int tokens.

    Packed rows pass `segment_ids` (0 = padding) and per-document positions;
    tokens attend only within their segment. `routing` (an
    `ir_jax.RoutingSpec`) executes or approximates each unit per token; None
    runs the dense model. `rng` feeds random / Gumbel routing; `return_aux`
    also returns the routing statistics (see `ir_jax.routing`).

    The routed forward lives in `ir_jax.routing`, which builds on this module;
    the spec carries it (`RoutingSpec.forward`), so this module never imports it.
    """
    if routing is not None:
      return routing.forward(
        self, tokens_BxT, positions_BxT, segment_ids_BxT, rng=rng, return_aux=return_aux
      )
    b, t = tokens_BxT.shape
    index_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if positions_BxT is None:
      positions_BxT = index_BxT
    x = self.embed(tokens_BxT)

    def layer_fn(layer: DecoderLayer, _r: Any, x: Array, _: Any) -> tuple[Array, None]:
      return layer(x, positions_BxT, index_BxT, segment_ids_BxT), None

    x, _ = self.run_layers(layer_fn, x)
    logits = self.logits(x)
    return (logits, {}) if return_aux else logits


def init_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
  """A randomly initialised model (for tests and tiny configs)."""
  return Llama(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: LlamaConfig) -> Llama:
  """The model with ShapeDtypeStruct leaves: shapes and axis names, no memory."""
  return nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(params=0)))
