"""The `train`, `routing` and `mesh` sections of a config, validated before anything compiles.

A config file (see configs/) is a Python module whose `get_config()` returns
an `ml_collections.ConfigDict` with sections:

  model    shapes (ir_jax.config.LlamaConfig fields) + `checkpoint`, the base weights
           ('' is refused unless `random_init=True`: random weights, for smoke tests)
  data     ir_jax.data.DataConfig fields
  train    TrainConfig below, with one sub-section per stage
  routing  ir_jax.RoutingSpec fields: the policy and target sparsity to train and evaluate
  mesh     data / fsdp / tensor sizes (-1 fills)

`settings_from_config` turns it into frozen dataclasses; every unknown field
and every bad value is a ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ir_jax.config import ConfigError, LlamaConfig, from_config_dict, is_int, is_number
from ir_jax.config_sections import ROUTING_FIELDS, routing_spec
from ir_jax.config_sections import build_section as _build
from ir_jax.data.config import DataConfig, data_config
from ir_jax.routing import RoutingSpec, is_temperature
from ir_jax.sharding import MeshConfig

STAGES = ("forecaster", "router", "distill", "lora")
SCHEDULES = ("constant", "cosine", "linear")
SECTIONS = ("model", "data", "train", "routing", "mesh")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """Optimizer and budget of one stage (AdamW with gradient clipping).

  steps:         optimizer updates; each consumes `grad_accum` batches.
  learning_rate: peak learning rate.
  schedule:      constant | cosine (to 0) | linear (to 0), after `warmup`.
  warmup:        fraction of `steps` with a linear warm-up from 0.
  weight_decay:  AdamW decoupled weight decay.
  grad_clip:     global-norm clipping (0: none).
  grad_accum:    batches accumulated per update (optax.MultiSteps).
  batch_size:    rows per batch for this stage (0: data.batch_size).
  seq_len:       tokens per row for this stage (0: data.seq_len).
  """

  steps: int = 2000
  learning_rate: float = 1e-3
  schedule: str = "cosine"
  warmup: float = 0.0
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  grad_accum: int = 1
  batch_size: int = 0
  seq_len: int = 0

  def validate(self, name: str) -> None:
    def integer(field: str, low: int) -> None:
      v = getattr(self, field)
      if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"train.{name}.{field} must be an integer >= {low}, got {v!r}")

    def number(field: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
      v = getattr(self, field)
      ok = is_number(v) and (v > low if low_open else v >= low) and v <= high
      if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (
          f" and <= {high}" if high < math.inf else ""
        )
        raise ConfigError(f"train.{name}.{field} must be a number {bound}, got {v!r}")

    integer("steps", 0 if getattr(self, "init", "none") == "fit" else 1)
    number("learning_rate", 0.0, low_open=True)
    if self.schedule not in SCHEDULES:
      raise ConfigError(
        f"train.{name}.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}"
      )
    number("warmup", 0.0, 1.0)
    number("weight_decay", 0.0)
    number("grad_clip", 0.0)
    integer("grad_accum", 1)
    integer("batch_size", 0)
    integer("seq_len", 0)
    if self.seq_len == 1:
      raise ConfigError(f"train.{name}.seq_len must be 0 (data.seq_len) or >= 2, got 1")
    if self.steps * self.grad_accum >= 2**31:  # the step counter is an int32 on device
      raise ConfigError(
        f"train.{name}.steps x grad_accum must be below 2**31, got {self.steps} x {self.grad_accum}"
      )


INITS = ("fit", "none")
ALLOCATIONS = ("error", "probe", "uniform")


def _check_fit(stage_cfg: StageConfig, name: str) -> None:
  if stage_cfg.init not in INITS:
    raise ConfigError(f"train.{name}.init must be one of {list(INITS)}, got {stage_cfg.init!r}")
  if not is_int(stage_cfg.fit_batches) or stage_cfg.fit_batches < 1:
    raise ConfigError(
      f"train.{name}.fit_batches must be an integer >= 1, got {stage_cfg.fit_batches!r}"
    )
  if not (is_number(stage_cfg.ridge) and stage_cfg.ridge > 0):
    raise ConfigError(f"train.{name}.ridge must be a number > 0, got {stage_cfg.ridge!r}")


@dataclasses.dataclass(frozen=True)
class ForecasterStage(StageConfig):
  """Forecasters regress their unit's output (SmoothL1, beta 1, summed over units).

  init:        fit (closed-form reduced-rank ridge regression per unit from one
               pass of statistics over `fit_batches` batches, before any step;
               `steps` may then be 0) or none (SGD from the small random init).
  fit_batches: batches of statistics for the fit.
  ridge:       ridge strength, relative to the mean eigenvalue of each unit's
               input covariance.
  outlier:     tokens whose unit output energy is above `outlier` x the batch's mean
               are left out of the fit (secondary sinks with massive activations would
               otherwise decide it; on SmolLM2 one such token in 48k broke layer 11's
               MLP forecast).
  """

  init: str = "fit"
  fit_batches: int = 12
  ridge: float = 1e-2
  outlier: float = 100.0

  def validate(self, name: str) -> None:
    super().validate(name)
    _check_fit(self, name)
    if not (is_number(self.outlier) and self.outlier > 1) and self.outlier != float("inf"):
      raise ConfigError(
        f"train.{name}.outlier must be a number > 1 (or inf: keep every "
        f"token), got {self.outlier!r}"
      )


@dataclasses.dataclass(frozen=True)
class RouterStage(StageConfig):
  """Routers with frozen forecasters.

  gate:               gumbel (binary Gumbel-softmax, straight-through, every unit
                      computed: exact informed gradient for every token) or ste
                      (top-k at the target capacity, straight-through, gathered).
  temperature_start / temperature_end: Gumbel temperature, annealed linearly.
  sparsity_weight:    weight of |capacity - mean execute rate|.
  importance_weight:  weight of mean (1 - g) (1 - cos(x, x + Unit(n))).
  calibration_batches: batches used at the end to calibrate causal thresholds (0: skip).
  prior_bias:         untrained routers (output bias 0) start with bias logit(capacity),
                      so Gumbel gates execute the target fraction from the first step
                      (init='none' only).
  init:               fit (warm start: each router regresses its unit's log forecast
                      error on the unit input, ridge, from `fit_batches` batches; the
                      oracle's choice made learnable) or none.
  allocation:         the per-unit capacity table, allocated once the routers are
                      warm-started and stored with them. error (default): each unit's
                      damage curve is the relative forecast error |Unit(n) - LFF(n)|^2 /
                      |x|^2 its router leaves behind at each sparsity, measured on
                      `allocation_batches` batches; sparsity goes greedily where the
                      curves rise least. probe: each unit's measured loss increase when
                      it alone approximates `probe_level` of the tokens, extrapolated
                      quadratically (60 forward passes for 30 layers; noisier). uniform:
                      every unit at the target capacity. With an executed-FLOPs budget
                      (routing.flops): error weights each unit's curve by its cost and
                      bisects to the budget; probe (and the static policy) probes each
                      unit's loss damage when forecast alone and picks execute /
                      forecast / route per unit by a knapsack (ir_jax.routing.budget).
  allocation_batches: batches for the allocation measurements.
  budget:             pairs (the table's mean sparsity over (token, unit) pairs is the
                      target, the paper's measure) or flops (error allocation only: the
                      table saves the matmul FLOPs a uniform target would, spent where
                      damage per FLOP saved is least).
  max_sparsity:       no unit of the table approximates more than this fraction.
  """

  learning_rate: float = 2e-3
  schedule: str = "constant"
  gate: str = "gumbel"
  temperature_start: float = 5.0
  temperature_end: float = 1.0
  sparsity_weight: float = 8.0
  importance_weight: float = 0.1
  calibration_batches: int = 4
  prior_bias: bool = True
  init: str = "fit"
  fit_batches: int = 8
  ridge: float = 1e-2
  allocation: str = "error"
  allocation_batches: int = 2
  budget: str = "pairs"
  probe_level: float = 0.5
  max_sparsity: float = 0.875

  def validate(self, name: str) -> None:
    super().validate(name)
    if self.gate not in ("gumbel", "ste"):
      raise ConfigError(f"train.router.gate must be 'gumbel' or 'ste', got {self.gate!r}")
    for f in ("temperature_start", "temperature_end"):
      v = getattr(self, f)
      if not is_temperature(v):
        raise ConfigError(
          f"train.router.{f} must be a number > 0 that float32 holds "
          f"(about 1e-38 to 3e38), got {v!r}"
        )
    for f in ("sparsity_weight", "importance_weight"):
      v = getattr(self, f)
      if not (is_number(v) and v >= 0):
        raise ConfigError(f"train.router.{f} must be a finite number >= 0, got {v!r}")
    if not isinstance(self.prior_bias, bool):
      raise ConfigError(f"train.router.prior_bias must be True or False, got {self.prior_bias!r}")
    _check_fit(self, name)
    if self.allocation not in ALLOCATIONS:
      raise ConfigError(
        f"train.router.allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}"
      )
    if self.budget not in ("pairs", "flops"):
      raise ConfigError(f"train.router.budget must be 'pairs' or 'flops', got {self.budget!r}")
    if self.budget == "flops" and self.allocation != "error":
      raise ConfigError("train.router.budget='flops' needs train.router.allocation='error'")
    if not is_int(self.allocation_batches) or self.allocation_batches < 1:
      raise ConfigError(
        f"train.router.allocation_batches must be an integer >= 1, got {self.allocation_batches!r}"
      )
    for f in ("probe_level", "max_sparsity"):
      v = getattr(self, f)
      if not (is_number(v) and 0 < v <= 1):
        raise ConfigError(f"train.router.{f} must be a number in (0, 1], got {v!r}")
    if not is_int(self.calibration_batches) or self.calibration_batches < 0:
      raise ConfigError(
        f"train.router.calibration_batches must be an integer >= 0, "
        f"got {self.calibration_batches!r}"
      )


@dataclasses.dataclass(frozen=True)
class LoraStage(StageConfig):
  """LoRA on q, v and the MLP gate projection, with the routed forward; routers and
  forecasters frozen. `rank` and `alpha` become model.lora_rank / lora_alpha."""

  steps: int = 1000
  learning_rate: float = 2e-4
  schedule: str = "cosine"
  warmup: float = 0.1
  weight_decay: float = 0.0
  rank: int = 16
  alpha: float = 32.0

  def validate(self, name: str) -> None:
    super().validate(name)
    if not is_int(self.rank) or self.rank < 1:
      raise ConfigError(f"train.lora.rank must be an integer >= 1, got {self.rank!r}")
    if not (is_number(self.alpha) and self.alpha > 0):
      raise ConfigError(f"train.lora.alpha must be a number > 0, got {self.alpha!r}")


@dataclasses.dataclass(frozen=True)
class DistillStage(StageConfig):
  """Forecasters trained end to end after the router stage: the KL divergence from the
  dense model's next-token distribution to the routed model's, under hard top-k routing
  with the model's trained capacity table (what evaluation and export route with). Only
  the forecasters train; base weights, routers and the table are frozen. The closed-form
  fit regresses each unit's output alone; this stage fits what the forecasts do to the
  next-token distribution, through every layer after them.

  centred: take centred updates, as the forecaster stage does after a closed-form fit
           (`ir_jax.train.steps.optimizer`); set False for forecasters trained from
           scratch (forecaster.init=none), whose hidden units do not sit at the fit's offset.
  """

  steps: int = 200
  learning_rate: float = 5e-4
  schedule: str = "cosine"
  warmup: float = 0.05
  weight_decay: float = 0.0
  centred: bool = True

  def validate(self, name: str) -> None:
    super().validate(name)
    if not isinstance(self.centred, bool):
      raise ConfigError(f"train.{name}.centred must be True or False, got {self.centred!r}")


_STAGE_TYPES = {
  "forecaster": ForecasterStage,
  "router": RouterStage,
  "distill": DistillStage,
  "lora": LoraStage,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What to train and how often to log, checkpoint and evaluate.

  stages:           comma-separated, in order: forecaster, router, distill, lora.
  init_from:        another run's workdir whose result (base + trained modules)
                    the first stage starts from ('' : model.checkpoint, fresh modules).
  seed:             initialisation of new modules and Gumbel noise.
  log_every:        steps between metric lines (JSONL, TensorBoard, console).
  checkpoint_every: steps between checkpoints (one is always written at the end).
  keep_checkpoints: checkpoints kept per stage.
  async_checkpoints: write checkpoints in a background thread.
  eval_batches:     held-out batches for the final dense-vs-routed perplexity (0: skip);
                    the evaluation stops sooner when the split is used up.
  eval_doc_tokens:  that evaluation scores each held-out document's first N tokens
                    (0: whole documents), so its interval rests on many documents
                    rather than on a few long ones.
  tensorboard:      also write TensorBoard event files (needs tensorboardX).
  """

  stages: str = "forecaster,router"
  init_from: str = ""
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  eval_batches: int = 16
  eval_doc_tokens: int = 0
  tensorboard: bool = True
  forecaster: ForecasterStage = ForecasterStage()
  router: RouterStage = RouterStage()
  distill: DistillStage = DistillStage()
  lora: LoraStage = LoraStage()

  @property
  def stage_list(self) -> tuple[str, ...]:
    return tuple(s.strip() for s in self.stages.split(",") if s.strip())

  def stage(self, name: str) -> StageConfig:
    return getattr(self, name)

  def validate(self) -> None:
    if not isinstance(self.stages, str):
      raise ConfigError(f"train.stages must be a comma-separated string, got {self.stages!r}")
    stages = self.stage_list
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
      raise ConfigError(
        f"train.stages must list stages from {list(STAGES)} separated by commas, "
        f"got {self.stages!r}"
      )
    if len(set(stages)) != len(stages):
      raise ConfigError(f"train.stages names a stage twice: {self.stages!r}")
    for name, low in (
      ("seed", 0),
      ("log_every", 1),
      ("checkpoint_every", 1),
      ("keep_checkpoints", 1),
      ("eval_batches", 0),
      ("eval_doc_tokens", 0),
    ):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"train.{name} must be an integer >= {low}, got {v!r}")
    for name in ("async_checkpoints", "tensorboard"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"train.{name} must be True or False, got {getattr(self, name)!r}")
    if not isinstance(self.init_from, str):
      raise ConfigError(f"train.init_from must be a path string, got {self.init_from!r}")
    for s in STAGES:
      self.stage(s).validate(s)


@dataclasses.dataclass(frozen=True)
class Settings:
  """A whole validated config."""

  model: LlamaConfig
  model_checkpoint: str
  data: DataConfig
  train: TrainConfig
  routing: RoutingSpec
  mesh: MeshConfig
  raw: dict[str, Any]  # the config as plain JSON-able data (saved with checkpoints)
  model_random_init: bool = False  # model.random_init: no checkpoint means random weights

  def with_lora_adapters(self) -> Settings:
    """These settings with a model that carries LoRA adapters of `train.lora`'s rank."""
    lora = self.train.lora
    model = self.model.replace(lora_rank=lora.rank, lora_alpha=float(lora.alpha))
    return dataclasses.replace(self, model=model)

  def stage_data(self, stage: str) -> DataConfig:
    """The data config with the stage's batch size / sequence length overrides."""
    stage_cfg = self.train.stage(stage)
    changes = {}
    if stage_cfg.batch_size:
      changes["batch_size"] = stage_cfg.batch_size
    if stage_cfg.seq_len:
      changes["seq_len"] = stage_cfg.seq_len
    return dataclasses.replace(self.data, **changes) if changes else self.data


def _plain(d: Any) -> Any:
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  if isinstance(d, dict):
    return {k: _plain(v) for k, v in d.items()}
  if isinstance(d, (list, tuple)):
    return [_plain(v) for v in d]
  return d


def _section(cfg: Any, name: str) -> dict[str, Any]:
  if name not in cfg or cfg[name] is None:
    return {}
  d = _plain(cfg[name])
  if not isinstance(d, dict):
    raise ConfigError(f"config section `{name}` must be a dict, got {type(d).__name__}")
  return d


def train_config(d: dict[str, Any]) -> TrainConfig:
  d = dict(d)
  for s in STAGES:
    sub = d.pop(s, None) or {}
    if not isinstance(sub, dict):
      raise ConfigError(f"train.{s} must be a dict of stage settings, got {sub!r}")
    d[s] = _build(_STAGE_TYPES[s], sub, f"train.{s}")
  tc = _build(TrainConfig, d, "train")
  tc.validate()
  return tc


def settings_from_config(cfg: Any) -> Settings:
  """Validates a whole ConfigDict (or dict); raises ConfigError on the first problem."""
  top = set(cfg.keys())
  unknown = sorted(top - set(SECTIONS))
  if unknown:
    raise ConfigError(f"unknown config sections {unknown}; known: {list(SECTIONS)}")
  if "model" not in top:
    raise ConfigError("the config has no `model` section (see configs/tiny.py)")
  model_d = _section(cfg, "model")
  ckpt = model_d.get("checkpoint", "") or ""
  if not isinstance(ckpt, str):
    raise ConfigError(f"model.checkpoint must be a path string, got {ckpt!r}")
  random_init = model_d.get("random_init", False)
  if not isinstance(random_init, bool):
    raise ConfigError(f"model.random_init must be True or False, got {random_init!r}")
  model = from_config_dict(model_d)
  if "data" not in top:
    raise ConfigError(
      "the config has no `data` section; add cfg.data = ConfigDict(...) (see configs/tiny.py)"
    )
  data = data_config(_section(cfg, "data"), ckpt)  # a ConfigDict or a plain dict
  train = train_config(_section(cfg, "train"))
  routing = routing_spec(_section(cfg, "routing"))
  mesh = _build(MeshConfig, _section(cfg, "mesh"), "mesh")
  routing.check_layers(model.num_layers)
  if routing.policy == "dense" and "router" in train.stage_list:
    raise ConfigError(
      "routing.policy is 'dense' but train.stages has 'router'; routers train "
      "for 'informed' or 'greedy' routing"
    )
  raw = {s: _section(cfg, s) for s in SECTIONS if s in top}
  settings = Settings(
    model=model,
    model_checkpoint=ckpt,
    data=data,
    train=train,
    routing=routing,
    mesh=mesh,
    raw=raw,
    model_random_init=random_init,
  )
  # The lora stage trains adapters the model must carry from the start (ir_jax.train.stages).
  return settings.with_lora_adapters() if "lora" in train.stage_list else settings


def default_config() -> Any:
  """A ConfigDict with the train, routing and mesh sections at their defaults.

  Config files start from it and add `model` and `data`, so every field exists
  and can be overridden from the command line (`--config.train.router.steps=50`).
  """
  import ml_collections

  def as_dict(dc: Any) -> dict[str, Any]:
    return {
      f.name: (
        as_dict(getattr(dc, f.name))
        if dataclasses.is_dataclass(getattr(dc, f.name))
        else getattr(dc, f.name)
      )
      for f in dataclasses.fields(dc)
    }

  cfg = ml_collections.ConfigDict()
  cfg.train = ml_collections.ConfigDict(as_dict(TrainConfig()))
  spec = RoutingSpec(sparsity=0.4)
  cfg.routing = ml_collections.ConfigDict({f: getattr(spec, f) for f in ROUTING_FIELDS})
  # None by default; typed so that a table can be given on the command line:
  # --config.routing.capacities='((0.5, 0.9), (0.6, 0.9), ...)' (one (attn, mlp) per layer).
  cfg.routing.capacities = ml_collections.config_dict.placeholder(tuple)
  cfg.mesh = ml_collections.ConfigDict(as_dict(MeshConfig()))
  return cfg
