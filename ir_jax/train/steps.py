"""Per-stage losses, optimizers and the jitted train / eval steps.

A stage trains one parameter type (ir_jax.train.stages) and freezes everything else:
the model is split into (graphdef, trainable, frozen) and only `trainable`
enters the optimizer, so frozen weights are never copied into optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ir_jax.fit.common import OFFSET
from ir_jax.losses import lm_loss
from ir_jax.model import ADAPTERS, Llama  # noqa: F401  (ADAPTERS: also importable from here)
from ir_jax.nll import token_nll
from ir_jax.routing import RoutingSpec, mean_capacity, routed_forward, sink_mask
from ir_jax.routing.capacity import present as table_present
from ir_jax.train.config import DistillStage, ForecasterStage, RouterStage, StageConfig

Array = jax.Array


# ------------------------------------------------------------ optimizers
def schedule(stage_cfg: StageConfig) -> optax.Schedule:
  warm = int(round(stage_cfg.warmup * stage_cfg.steps))
  rest = max(stage_cfg.steps - warm, 1)
  if stage_cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(stage_cfg.learning_rate, rest)
  elif stage_cfg.schedule == "linear":
    main = optax.linear_schedule(stage_cfg.learning_rate, 0.0, rest)
  else:
    main = optax.constant_schedule(stage_cfg.learning_rate)
  if not warm:
    return main
  return optax.join_schedules(
    [optax.linear_schedule(0.0, stage_cfg.learning_rate, warm), main], [warm]
  )


def _centred_forecaster_updates(updates: Any, offset: float) -> Any:
  """Moves each forecaster's b2 update by -offset x (its W2 update summed over the rank).

  A closed-form forecaster (ir_jax.fit.forecasters) holds every hidden unit at
  offset + z (z about unit scale) and cancels the constant in b2. Adam moves every W2
  entry by about the learning rate, which alone would shift the output by about
  offset x rank x lr per dimension (SmolLM2: ~1.2 at lr 1e-3) and wreck the fit in one
  step; with this correction the step changes the output only through z, as an update
  of the centred form z W2 + (b2 + offset 1^T W2) would."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
  keys = [jax.tree_util.keystr(p) for p, _ in flat]
  leaves = [v for _, v in flat]
  index = {k: i for i, k in enumerate(keys)}
  for i, k in enumerate(keys):
    if "_lff']" in k and "['w2']" in k:
      j = index.get(k.replace("['w2']", "['b2']"))
      if j is not None:
        shift = offset * jnp.sum(leaves[i].astype(jnp.float32), axis=-2)
        leaves[j] = (leaves[j].astype(jnp.float32) - shift).astype(leaves[j].dtype)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _centred(tx: optax.GradientTransformation, offset: float) -> optax.GradientTransformation:
  """`tx` whose forecaster updates are centred (`_centred_forecaster_updates`); the state
  is `tx`'s own, so checkpoints of either load into the other."""

  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return _centred_forecaster_updates(updates, offset), state

  return optax.GradientTransformation(tx.init, update)


def optimizer(stage_cfg: StageConfig) -> optax.GradientTransformation:
  """AdamW with the stage's schedule, clipping and accumulation; forecaster steps after a
  closed-form fit, and distill steps unless told otherwise, take centred updates
  (`_centred_forecaster_updates`)."""
  parts = [optax.clip_by_global_norm(stage_cfg.grad_clip)] if stage_cfg.grad_clip > 0 else []
  adam = optax.adamw(schedule(stage_cfg), weight_decay=stage_cfg.weight_decay)
  fitted = isinstance(stage_cfg, ForecasterStage) and stage_cfg.init == "fit"
  if fitted or (isinstance(stage_cfg, DistillStage) and stage_cfg.centred):
    adam = _centred(adam, OFFSET)
  parts.append(adam)
  tx = optax.chain(*parts)
  if stage_cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=stage_cfg.grad_accum)
  return tx


# ----------------------------------------------------------------- losses
def smooth_l1(pred: Array, target: Array, valid_BxT: Array) -> Array:
  """SmoothL1 (beta 1; optax's Huber loss with delta 1) averaged over valid tokens and
  features."""
  per = optax.huber_loss(pred.astype(jnp.float32), target.astype(jnp.float32), delta=1.0)
  per = per.mean(-1)
  return jnp.sum(per * valid_BxT) / jnp.maximum(jnp.sum(valid_BxT), 1.0)


def _explained(pred: Array, target: Array, valid_BxT: Array) -> Array:
  """1 - |f - u|^2 / |u|^2 over valid tokens: the fraction of the unit output forecast."""
  err = jnp.sum(jnp.square((pred - target).astype(jnp.float32)), -1)
  tot = jnp.sum(jnp.square(target.astype(jnp.float32)), -1)
  return 1.0 - jnp.sum(err * valid_BxT) / jnp.maximum(jnp.sum(tot * valid_BxT), 1e-12)


def forecaster_loss(model: Llama, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
  """Dense forward; each forecaster regresses its unit's output from the unit input
  (ordinary tokens: segment starts excluded).

  Inputs and targets are stop-gradient, so the only backward pass is through
  the forecasters; the LM head is never computed.
  """
  tokens, positions, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
  b, t = tokens.shape
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  # Ordinary tokens only: segment starts always execute (routing.sink_mask), and their
  # massive activations would dominate both the loss and the explained variance.
  valid = ((seg > 0) & ~sink_mask(index, seg)).astype(jnp.float32)
  sg = jax.lax.stop_gradient

  def layer_fn(layer, routing_layer, x, _):
    n = sg(layer.input_layernorm(x))
    a = sg(layer.self_attn(n, positions, index, seg))
    fa = routing_layer.attn_lff(n)
    x = x + a
    n2 = sg(layer.post_attention_layernorm(x))
    m = sg(layer.mlp(n2))
    fm = routing_layer.mlp_lff(n2)
    losses = jnp.stack([smooth_l1(fa, a, valid), smooth_l1(fm, m, valid)])
    explained = jnp.stack([_explained(fa, a, valid), _explained(fm, m, valid)])
    return x + m, (losses, explained)

  _, (losses_Lx2, explained_Lx2) = model.run_layers(layer_fn, sg(model.embed(tokens)))
  loss = jnp.sum(losses_Lx2)
  return loss, {
    "loss": loss,
    "lff_attn": jnp.mean(losses_Lx2[:, 0]),
    "lff_mlp": jnp.mean(losses_Lx2[:, 1]),
    "explained_attn": jnp.mean(explained_Lx2[:, 0]),
    "explained_mlp": jnp.mean(explained_Lx2[:, 1]),
  }


def router_spec(routing: RoutingSpec, router_cfg: RouterStage) -> RoutingSpec:
  """The training form of the configured routing: straight-through gates."""
  if router_cfg.gate == "gumbel":
    return dataclasses.replace(routing, mode="topk", gate="gumbel", compute="all")
  return dataclasses.replace(routing, mode="topk", gate="ste", compute="gathered")


def router_loss(
  model: Llama,
  batch: dict[str, Array],
  spec: RoutingSpec,
  router_cfg: RouterStage,
  temperature: Array,
  rng: Array,
) -> tuple[Array, dict[str, Array]]:
  logits, aux = routed_forward(
    model,
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    spec,
    rng=rng,
    return_aux=True,
    temperature=temperature,
  )
  lm, _ = lm_loss(logits, batch)
  exec_Lx2 = aux["exec_rate"]
  capacity = mean_capacity(spec)
  # With a trained capacity table each unit is held to its own capacity (the
  # table is what evaluation routes with); without one, the mean rate is.
  table_Lx2 = model.routing.capacity[...]
  has_table = table_present(table_Lx2)
  sparsity_pen = jnp.where(
    has_table, jnp.mean(jnp.abs(table_Lx2 - exec_Lx2)), jnp.abs(capacity - jnp.mean(exec_Lx2))
  )
  importance = jnp.mean(aux["importance"])
  loss = lm + router_cfg.sparsity_weight * sparsity_pen + router_cfg.importance_weight * importance
  return loss, {
    "loss": loss,
    "lm": lm,
    "sparsity_penalty": sparsity_pen,
    "importance": importance,
    "temperature": temperature,
    "sparsity_attn": 1.0 - jnp.mean(exec_Lx2[:, 0]),
    "sparsity_mlp": 1.0 - jnp.mean(exec_Lx2[:, 1]),
  }


def _routed_metrics(loss: Array, lm: Array, exec_Lx2: Array) -> dict[str, Array]:
  """What a stage that trains under hard top-k routing logs (lora, distill)."""
  return {
    "loss": loss,
    "lm": lm,
    "sparsity_attn": 1.0 - jnp.mean(exec_Lx2[:, 0]),
    "sparsity_mlp": 1.0 - jnp.mean(exec_Lx2[:, 1]),
  }


def lora_loss(
  model: Llama, batch: dict[str, Array], spec: RoutingSpec
) -> tuple[Array, dict[str, Array]]:
  logits, aux = routed_forward(
    model, batch["inputs"], batch["positions"], batch["segment_ids"], spec, return_aux=True
  )
  lm, _ = lm_loss(logits, batch)
  return lm, _routed_metrics(lm, lm, aux["exec_rate"])


def distill_loss(
  model: Llama, batch: dict[str, Array], spec: RoutingSpec
) -> tuple[Array, dict[str, Array]]:
  """KL(dense || routed) of the next-token distributions, averaged over scored tokens.

  The teacher is the same model run dense (its forward reads no forecaster, so no
  gradient flows into it); the student routes with `spec` (hard top-k with the table)."""
  inputs, positions, segments = batch["inputs"], batch["positions"], batch["segment_ids"]
  teacher = jax.lax.stop_gradient(model(inputs, positions, segments))
  logits, aux = routed_forward(model, inputs, positions, segments, spec, return_aux=True)
  logp_t = jax.nn.log_softmax(teacher.astype(jnp.float32), axis=-1)
  logp_s = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  kl_BxT = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
  mask = batch["loss_mask"].astype(jnp.float32)
  kl = jnp.sum(kl_BxT * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  lm, _ = lm_loss(logits, batch)
  return kl, _routed_metrics(kl, lm, aux["exec_rate"])


LossFn = Callable[[Llama, dict[str, Array], Array], tuple[Array, dict]]


# ------------------------------------------------------------------ steps
# One builder per stage: (stage config, the routing the stage trains under, seed) ->
# loss(model, batch, step) -> (loss, metrics). ir_jax.train.stages names them.
def forecaster_loss_fn(stage_cfg: StageConfig, spec: RoutingSpec | None, seed: int) -> LossFn:
  return lambda model, batch, step: forecaster_loss(model, batch)


def router_loss_fn(stage_cfg: StageConfig, spec: RoutingSpec | None, seed: int) -> LossFn:
  """Gumbel-gate LM loss whose temperature anneals linearly over the stage's batches."""
  assert isinstance(stage_cfg, RouterStage) and spec is not None
  base_key = jax.random.key(seed)

  def loss(model, batch, step):
    frac = jnp.minimum(
      step.astype(jnp.float32) / max(stage_cfg.steps * stage_cfg.grad_accum - 1, 1), 1.0
    )
    temp = (
      stage_cfg.temperature_start + (stage_cfg.temperature_end - stage_cfg.temperature_start) * frac
    )
    return router_loss(model, batch, spec, stage_cfg, temp, jax.random.fold_in(base_key, step))

  return loss


def distill_loss_fn(stage_cfg: StageConfig, spec: RoutingSpec | None, seed: int) -> LossFn:
  assert spec is not None
  return lambda model, batch, step: distill_loss(model, batch, spec)


def lora_loss_fn(stage_cfg: StageConfig, spec: RoutingSpec | None, seed: int) -> LossFn:
  assert spec is not None
  return lambda model, batch, step: lora_loss(model, batch, spec)


def make_train_step(graphdef: Any, loss_fn: Callable, tx: optax.GradientTransformation):
  """step(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics)."""

  def step_fn(trainable, opt_state, frozen, batch, step):
    def f(tr):
      model = nnx.merge(graphdef, tr, frozen)
      return loss_fn(model, batch, step)

    (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return trainable, opt_state, metrics

  return step_fn


def make_eval_step(graphdef: Any, spec: RoutingSpec | None):
  """eval(state, batch) -> {nll_sum, tokens, nll_BxT (per scored token, 0 elsewhere), exec_rate
  [L, 2] or absent}: dense when spec is None."""

  def eval_fn(state, batch):
    model = nnx.merge(graphdef, state)
    if spec is None:
      logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
      aux = None
    else:
      logits, aux = model(
        batch["inputs"], batch["positions"], batch["segment_ids"], routing=spec, return_aux=True
      )
    mean, count = lm_loss(logits, batch)
    nll_BxT = token_nll(logits, batch["targets"]) * batch["loss_mask"].astype(jnp.float32)
    out = {"nll_sum": mean * count, "tokens": count, "nll_BxT": nll_BxT}
    if aux is not None:
      out["exec_rate"] = aux["exec_rate"]
    return out

  return eval_fn
