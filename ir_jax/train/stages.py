"""The stage table: what each training stage is, in one place.

A row names the parameter type the stage trains (everything else is frozen),
the routing it trains under, its loss, its closed-form start (run when the
stage's `init` is "fit"), what runs at the start of a fresh stage and what
runs after its last step (before the final checkpoint), and whether the model
carries LoRA adapters for it. Training (ir_jax.train.loop, .stepfns) and the
ahead-of-time proof (ir_jax.aot) look a stage up here and nowhere else, so the
compiled proof cannot drift from what training runs. Adding a stage is a row
here plus its config section (ir_jax.train.config.STAGES names the same rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
from flax import nnx

from ir_jax.forecast import ForecasterParam, RouterParam
from ir_jax.model import Llama, LoraParam
from ir_jax.routing import RoutingSpec, trained_spec
from ir_jax.train import config, hooks, init, steps
from ir_jax.train.config import Settings, StageConfig
from ir_jax.train.metrics import MetricWriter


@dataclasses.dataclass
class HookContext:
  """What a stage's start and finish hooks may use."""

  settings: Settings
  stage_cfg: StageConfig
  mesh: jax.sharding.Mesh
  workdir: str
  writer: MetricWriter
  batches: Iterator[dict[str, Any]]  # the stage's training stream, where training left it
  step: int  # batches trained so far


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  trainable: type[nnx.Variable]
  # (routing, stage config) -> the routing the stage's loss runs (None: no routing).
  train_spec: Callable[[RoutingSpec, StageConfig], RoutingSpec | None]
  # (stage config, train_spec, seed) -> loss(model, batch, step) -> (loss, metrics).
  loss: Callable[[StageConfig, RoutingSpec | None, int], steps.LossFn]
  # (settings, stage config, model, training stream) -> metrics; fits `model` in place.
  fit: Callable[[Settings, StageConfig, Llama, Iterator[dict[str, Any]]], dict[str, float]] | None
  # (trainable, their shardings, context) -> trainable, on a fresh start without a fit.
  start: Callable[[nnx.State, nnx.State, HookContext], nnx.State] | None = None
  # (model, context) -> None, may change the frozen part of `model` in place.
  finish: Callable[[Llama, HookContext], None] | None = None
  lora: bool = False  # the model carries LoRA adapters (rank from train.lora)
  # Routes with the model's trained capacity table, as evaluation does (`stage_settings`).
  routes_with_table: bool = False
  # What the stage's logged `loss` is, printed when it starts training.
  loss_doc: str = ""

  def spec(self, settings: Settings) -> RoutingSpec | None:
    """The routing this stage trains under for `settings`."""
    return self.train_spec(settings.routing, settings.train.stage(self.name))

  def loss_fn(self, settings: Settings) -> steps.LossFn:
    stage_cfg = settings.train.stage(self.name)
    return self.loss(stage_cfg, self.spec(settings), settings.train.seed)


def _router_start(trainable: nnx.State, shardings: nnx.State, ctx: HookContext) -> nnx.State:
  if not ctx.stage_cfg.prior_bias:
    return trainable
  return hooks.prior_router_bias(trainable, ctx.settings.routing, shardings)


def _forecaster_finish(model: Llama, ctx: HookContext) -> None:
  if ctx.settings.train.eval_batches:
    hooks.report_forecasters(ctx.settings, model, ctx.mesh, ctx.workdir, ctx.writer, ctx.step)


def _router_finish(model: Llama, ctx: HookContext) -> None:
  if ctx.stage_cfg.calibration_batches:
    hooks.calibrate_router(ctx.settings, ctx.stage_cfg.calibration_batches, model, ctx.batches)


STAGES: dict[str, Stage] = {
  "forecaster": Stage(
    name="forecaster",
    trainable=ForecasterParam,
    train_spec=lambda routing, stage_cfg: None,  # regresses unit outputs; no routing
    loss=steps.forecaster_loss_fn,
    fit=init.fit_forecasters,
    finish=_forecaster_finish,
    loss_doc="SmoothL1 (beta 1) of each forecast against its unit's output on ordinary "
    "tokens, summed over the 2 x layers units (lff_attn, lff_mlp: the per-unit means)",
  ),
  "router": Stage(
    name="router",
    trainable=RouterParam,
    train_spec=steps.router_spec,  # Gumbel (or STE) gates at the model's capacity table
    loss=steps.router_loss_fn,
    fit=init.fit_routers,
    start=_router_start,
    finish=_router_finish,
    routes_with_table=True,
    loss_doc="lm (next-token NLL in nats under Gumbel gates) + sparsity_weight x "
    "sparsity_penalty (execute rate above the capacity table) + importance_weight x importance",
  ),
  "distill": Stage(
    name="distill",
    trainable=ForecasterParam,
    train_spec=lambda routing, stage_cfg: routing.inference(),  # hard top-k, as deployed
    loss=steps.distill_loss_fn,
    fit=None,
    routes_with_table=True,
    loss_doc="KL divergence (nats per token) from the dense model's next-token "
    "distribution to the routed model's under hard top-k routing with the model's trained "
    "capacity table; only the forecasters train",
  ),
  "lora": Stage(
    name="lora",
    trainable=LoraParam,
    train_spec=lambda routing, stage_cfg: routing.inference(),  # hard top-k, as deployed
    loss=steps.lora_loss_fn,
    fit=None,
    lora=True,
    routes_with_table=True,
    loss_doc="next-token NLL in nats under hard top-k routing with the model's trained "
    "capacity table at the routing budget (what evaluation and export route with)",
  ),
}
assert tuple(STAGES) == config.STAGES, "ir_jax.train.config.STAGES names the table's rows"


def stage_settings(settings: Settings, stage: str, model: Llama) -> Settings:
  """The settings `stage` trains under. A stage that routes with the table (router, LoRA)
  takes the model's trained capacity table, moved to the routing budget exactly as
  evaluation and export move it (`routing.trained_spec`), so it trains under the routing
  it is used with. Ask once the table is there: the router stage's own fit allocates it
  (`ir_jax.train.loop.train_stage` asks after the fit or restore)."""
  if not STAGES[stage].routes_with_table:
    return settings
  seq_len = settings.stage_data(stage).seq_len
  spec = trained_spec(model, settings.routing.inference(), seq_len=seq_len)
  return dataclasses.replace(settings, routing=spec)
