"""The training run: workdir, base weights, sharded state, stages, checkpoints, final eval.

Workdir layout:
  run.json                   model config, base weights, the config (a rerun must match)
  base/                      the imported base model (when model.checkpoint is GGUF / HF)
  checkpoints/<stage>/<N>/   orbax CheckpointManager steps: adapters (forecasters,
                             routers, thresholds, LoRA), optimizer state, data iterator
                             state, metadata; N counts batches of that stage
  metrics.jsonl, tensorboard/, eval.json

Rerunning the same command resumes: finished stages are restored from their
last checkpoint, an interrupted stage continues from its newest checkpoint
with the optimizer state and the data stream exactly where they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from ir_jax import checkpoint as model_ckpt
from ir_jax import sharding as sh
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.data import pipeline
from ir_jax.data.builder import catalogue_ready
from ir_jax.data.config import LOCAL, DataError
from ir_jax.data.packing import PACK
from ir_jax.forecast import NO_TABLE, CalibratedFor, Capacity
from ir_jax.model import Llama
from ir_jax.routing import RoutingSpec, calibrate_thresholds, model_table, trained_spec
from ir_jax.train import integrity, report, steps
from ir_jax.train.config import Settings
from ir_jax.train.init import forecaster_report, stage_init
from ir_jax.train.metrics import MetricWriter, console_line

RUN_FILE = "run.json"
RUN_FORMAT = "ir_jax.run"
RUN_VERSION = 1
# Model fields that fix the shapes of the base weights: a workdir or base
# checkpoint must agree on these.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "tie_word_embeddings")
ADAPTER_FIELDS = ("lff_rank", "router_hidden", "lora_rank")


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss); the message names the step."""


class Preempted(Exception):
  """A stop was requested (SIGTERM or `should_stop`); a checkpoint was saved first."""

  def __init__(self, stage: str, step: int) -> None:
    super().__init__(f"stopped at {stage} step {step} after saving a checkpoint; rerun the same "
                     "command to resume")
    self.stage, self.step = stage, step


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ------------------------------------------------------------ workdir
def _shape_diff(a: LlamaConfig, b: LlamaConfig, fields: tuple[str, ...]) -> list[str]:
  return [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields
          if getattr(a, f) != getattr(b, f)]


def read_run(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return None
  from ir_jax.config import read_json_object

  meta = read_json_object(path, ConfigError)
  if meta.get("format") != RUN_FORMAT or meta.get("version") != RUN_VERSION:
    raise ConfigError(f"{path}: not an ir_jax run of format {RUN_FORMAT} v{RUN_VERSION}")
  return meta


def check_workdir(workdir: str, s: Settings) -> dict[str, Any] | None:
  """The existing run.json, after checking it trains the same model; None if fresh."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} exists and is not a directory")
  meta = read_run(workdir)
  if meta is None:
    if os.path.isdir(workdir) and os.path.isdir(os.path.join(workdir, "checkpoints")):
      raise ConfigError(f"{workdir} holds checkpoints but no {RUN_FILE}; it is not a run this "
                        "version wrote. Choose an empty --workdir")
    return None
  try:
    old = LlamaConfig.from_dict(meta["model"])
  except (ConfigError, KeyError, TypeError) as e:
    raise ConfigError(f"{workdir}/{RUN_FILE}: bad model config ({e})") from None
  diff = _shape_diff(old, s.model, SHAPE_FIELDS + ADAPTER_FIELDS)
  if diff:
    raise ConfigError(f"--workdir {workdir} holds a run of a different model ({', '.join(diff)}); "
                      "choose another --workdir or the config it was started with")
  if meta.get("stages") != list(s.train.stage_list):
    raise ConfigError(f"--workdir {workdir} was started with train.stages "
                      f"{','.join(meta.get('stages') or [])!r}, now {s.train.stages!r}; "
                      "choose another --workdir")
  return meta


def check_data_ready(s: Settings) -> None:
  """Every catalogue dataset a stage reads is prepared (local text is prepared on use)."""
  seen = set()
  for stage in s.train.stage_list:
    data = s.stage_data(stage)
    if data.name != LOCAL and (data.name, data.data_dir) not in seen:
      seen.add((data.name, data.data_dir))
      catalogue_ready(data)


# ------------------------------------------------------------ base weights
def resolve_base(s: Settings, workdir: str) -> dict[str, Any]:
  """Where the base weights come from: {"kind": "checkpoint", "path"} or {"kind": "random"}.

  A GGUF file or HF directory in model.checkpoint is imported once into
  `workdir/base` (process 0; the others wait).
  """
  if s.train.init_from:
    other = read_run(s.train.init_from)
    if other is None:
      raise FileNotFoundError(f"train.init_from={s.train.init_from}: no {RUN_FILE}; expected the "
                              "--workdir of a finished ir_jax.train run")
    return dict(other["base"])
  src = s.model_checkpoint
  if not src:
    if not s.model_random_init:
      raise ConfigError("model.checkpoint is empty: point it at an ir_jax checkpoint, a "
                        "HuggingFace directory or a GGUF file (python -m ir_jax.convert import "
                        "makes the first), or pass --config.model.random_init=True to train on "
                        "random weights (smoke tests)")
    return {"kind": "random", "seed": s.train.seed}
  if not os.path.exists(src):
    raise FileNotFoundError(f"model.checkpoint {src}: no such file or directory (run "
                            "`bash launch/fetch_assets.sh` for the demo assets)")
  if os.path.isdir(src) and model_ckpt.is_checkpoint(src):
    return {"kind": "checkpoint", "path": os.path.abspath(src)}
  base = os.path.join(workdir, "base")
  if not model_ckpt.is_checkpoint(base):
    if jax.process_index() == 0:
      from ir_jax.convert import import_weights

      t0 = time.time()
      log(f"importing base weights {src} -> {base} ...")
      import_weights(src, base, param_dtype=s.model.param_dtype, overwrite=True)
      log(f"imported in {time.time() - t0:.1f}s")
    _barrier("import")
  return {"kind": "checkpoint", "path": os.path.abspath(base)}


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"ir_jax.train.{name}")


def _paths(tree: Any) -> dict[tuple, Any]:
  return {tuple(getattr(k, "key", getattr(k, "name", k)) for k in p): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _set_path(tree: dict, path: tuple, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# ------------------------------------------------------------ model state
@dataclasses.dataclass
class ModelState:
  graphdef: Any
  state: nnx.State  # the whole model state, sharded
  shardings: nnx.State  # NamedSharding per leaf


def abstract_state(cfg: LlamaConfig, mesh: jax.sharding.Mesh) -> tuple[Any, nnx.State, nnx.State]:
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(params=0))))
  return graphdef, abs_state, sh.state_shardings(abs_state, mesh)


def init_state(cfg: LlamaConfig, mesh: jax.sharding.Mesh, base: dict[str, Any],
               seed: int) -> ModelState:
  """Base weights (restored or random) and fresh adapters, created already sharded."""
  graphdef, abs_state, shardings = abstract_state(cfg, mesh)

  def fresh(filter_: Any, model_cfg: LlamaConfig = cfg) -> nnx.State:
    """Newly initialised leaves matching `filter_`, created sharded under jit
    (the leaves not returned are dead code that XLA drops)."""
    def make():
      return nnx.split_state(nnx.state(Llama(model_cfg, nnx.Rngs(params=seed))), filter_, ...)[0]

    out_sh = nnx.split_state(shardings, filter_, ...)[0]
    if model_cfg is not cfg:  # the same leaves of a model without LoRA
      out_sh = nnx.split_state(abstract_state(model_cfg, mesh)[2], filter_, ...)[0]
    return jax.jit(make, out_shardings=out_sh)()

  adapters = fresh(steps.ADAPTERS)
  if base["kind"] == "random":
    # Base weights of a model without LoRA, so that adding LoRA to a run does
    # not change the random base it trains on.
    seed = int(base.get("seed", seed))
    base_state = fresh(nnx.Not(steps.ADAPTERS), cfg.replace(lora_rank=0))
    return ModelState(graphdef, nnx.merge_state(base_state, adapters), shardings)

  path = base["path"]
  ckpt_cfg = model_ckpt.load_config(path)
  diff = _shape_diff(ckpt_cfg, cfg, SHAPE_FIELDS)
  if diff:
    raise ConfigError(f"the base checkpoint {path} does not match the config's model "
                      f"({', '.join(diff)}); fix the model section or model.checkpoint")
  # Restore the checkpoint's whole tree (orbax needs the saved structure), sharded
  # by the same rules, in the dtype this run wants for base weights.
  _, ck_abs, ck_sh = abstract_state(ckpt_cfg, mesh)
  wdt = cfg.weight_dtype
  target = jax.tree.map(lambda a, s_: jax.ShapeDtypeStruct(
      a.shape, wdt if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=s_),
      nnx.to_pure_dict(ck_abs), nnx.to_pure_dict(ck_sh))
  restored = _paths(model_ckpt.restore_params(path, target))
  base_abs, _ = nnx.split_state(abs_state, nnx.Not(steps.ADAPTERS), ...)
  merged: dict = {}
  for p, want in _paths(nnx.to_pure_dict(base_abs)).items():
    got = restored.get(p)
    if got is None or got.shape != want.shape:
      raise model_ckpt.CheckpointError(
          f"{path}: parameter {'/'.join(map(str, p))} is "
          f"{'missing' if got is None else f'shaped {got.shape}, expected {want.shape}'}")
    _set_path(merged, p, got)
  for p, v in _paths(nnx.to_pure_dict(adapters)).items():
    _set_path(merged, p, v)
  state = jax.tree.map(lambda x: x, abs_state)
  nnx.replace_by_pure_dict(state, merged)
  return ModelState(graphdef, state, shardings)


def split_adapters(ms: ModelState) -> tuple[nnx.State, nnx.State]:
  adapters, rest = nnx.split_state(ms.state, steps.ADAPTERS, ...)
  return adapters, rest


def adapter_target(ms: ModelState) -> nnx.State:
  """Restore target for the adapters: ShapeDtypeStructs with their shardings."""
  adapters, _ = split_adapters(ms)
  return sh.with_shardings(adapters, nnx.split_state(ms.shardings, steps.ADAPTERS, ...)[0])


def replace_adapters(ms: ModelState, adapters: nnx.State) -> None:
  _, rest = split_adapters(ms)
  ms.state = nnx.merge_state(rest, adapters)


# ------------------------------------------------------------ checkpoints
def _manager(directory: str, keep: int = 3, async_: bool = False) -> ocp.CheckpointManager:
  import grain.checkpoint as gcp

  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                      enable_async_checkpointing=async_, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                               item_handlers={"adapters": ocp.StandardCheckpointHandler(),
                                              "opt_state": ocp.StandardCheckpointHandler(),
                                              "data": gcp.CheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def restore_adapters(mgr: ocp.CheckpointManager, step: int, target: nnx.State) -> nnx.State:
  def restore(tgt: nnx.State) -> dict[str, Any]:
    return mgr.restore(step, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(tgt)))

  return restore_compat(restore, target)["adapters"]


def restore_compat(restore: Callable[[nnx.State], dict[str, Any]],
                   target: nnx.State) -> dict[str, Any]:
  """`restore(adapters_target)`, also for checkpoints written before newer adapter leaves.

  Checkpoints before capacity tables have no `capacity` (nor `calibrated_for`)
  leaves: they get NO_TABLE, uniform routing as the run that wrote them routed.
  Checkpoints before calibration records have no `calibrated_for`: NO_TABLE, so
  their thresholds are recalibrated (or causal routing refused) before use.
  """
  try:
    return restore(target)
  except ValueError as e:  # orbax: the tree structures do not match
    first = e
  for missing in ((CalibratedFor,), (Capacity, CalibratedFor)):
    absent, rest = nnx.split_state(target, nnx.Any(*missing), ...)
    try:
      out = dict(restore(rest))
    except Exception:
      continue
    fresh = jax.tree.map(
        lambda a: jax.device_put(jnp.full(a.shape, NO_TABLE, a.dtype), a.sharding)
        if getattr(a, "sharding", None) is not None else jnp.full(a.shape, NO_TABLE, a.dtype),
        absent)
    out["adapters"] = nnx.merge_state(out["adapters"], fresh)
    return out
  raise first


def _restore_whole(mgr: ocp.CheckpointManager, directory: str, restore: Callable[[int], Any], *,
                   quarantine: bool) -> tuple[int, Any] | None:
  """The newest checkpoint step that is whole (integrity record and orbax agree), restored.

  Damaged newer steps are logged (and, with `quarantine`, moved aside by process 0);
  when every step is damaged a CheckpointError says so and nothing is moved.
  """
  try:
    return integrity.restore_newest_whole(
        list(mgr.all_steps()), directory, restore, log,
        quarantine=quarantine and jax.process_index() == 0)
  except integrity.DamagedCheckpoint as e:
    raise model_ckpt.CheckpointError(str(e)) from None


def _record(mgr: ocp.CheckpointManager, directory: str, step: int) -> None:
  """Integrity record of committed step `step` (process 0); prunes records of deleted steps."""
  if jax.process_index() == 0:
    integrity.write_record(directory, step)
    integrity.prune_records(directory, set(mgr.all_steps()))


def _committed_steps(directory: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []


@contextlib.contextmanager
def _checkpoint_write(directory: str, step: int | None) -> Iterator[None]:
  """Turns a filesystem failure while writing checkpoint `step` (disk full, quota,
  permissions) into a one-line CheckpointError; the older whole steps stay as they were."""
  try:
    yield
  except model_ckpt.CheckpointError:
    raise
  except Exception as e:  # orbax re-raises its writer threads' errors, possibly chained
    cause: BaseException | None = e
    while cause is not None and not (isinstance(cause, OSError)
                                     or "No space left on device" in str(cause)):
      cause = cause.__cause__ or cause.__context__
    if cause is None:
      raise
    full = getattr(cause, "errno", None) == errno.ENOSPC or "No space left" in str(cause)
    why = "no space left on device" if full else (
        getattr(cause, "strerror", None) or str(cause).splitlines()[0])
    whole = _committed_steps(directory)
    raise model_ckpt.CheckpointError(
        f"cannot write checkpoint step {step} in {directory}: {why}; the newest complete "
        f"checkpoint is {f'step {whole[-1]}' if whole else 'none'}. Free space (or fix the "
        "directory) and rerun the same command to resume") from e


def run_result(workdir: str, mesh: jax.sharding.Mesh | None = None) -> ModelState:
  """The model a finished (or interrupted) run produced: base + its newest adapters."""
  meta = read_run(workdir)
  if meta is None:
    raise FileNotFoundError(f"{workdir}: no {RUN_FILE}; not an ir_jax.train workdir")
  cfg = LlamaConfig.from_dict(meta["model"])
  mesh = mesh or sh.make_mesh(sh.MeshConfig(data=-1))
  ms = init_state(cfg, mesh, meta["base"], int(meta.get("seed", 0)))
  for stage in reversed(meta["stages"]):
    d = stage_dir(workdir, stage)
    if not os.path.isdir(d):
      continue
    mgr = _manager(d)
    try:
      found = _restore_whole(mgr, d, lambda n: restore_adapters(mgr, n, adapter_target(ms)),
                             quarantine=False)
    finally:
      mgr.close()
    if found is not None:
      replace_adapters(ms, found[1])
      break
  return ms


def load_run_model(workdir: str) -> Llama:
  ms = run_result(workdir)
  return nnx.merge(ms.graphdef, ms.state)


# ------------------------------------------------------------ jitted steps
def jit_eval_step(graphdef: Any, shardings: nnx.State, spec: RoutingSpec | None,
                  mesh: jax.sharding.Mesh) -> Any:
  """eval(state, batch) jitted for `mesh`: dense when `spec` is None (also used by ir_jax.aot)."""
  return jax.jit(sh.with_mesh(steps.make_eval_step(graphdef, spec), mesh),
                 in_shardings=(shardings, jax.sharding.NamedSharding(mesh, sh.batch_spec(2))),
                 out_shardings=sh.replicated(mesh))


@dataclasses.dataclass
class StageStep:
  """A stage's jitted train step and the shardings and optimizer it was built with."""

  fn: Any  # (trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics)
  tx: optax.GradientTransformation
  abs_opt: Any  # optimizer state as ShapeDtypeStructs
  opt_sh: Any
  tr_sh: nnx.State
  fr_sh: nnx.State


def jit_stage_step(s: Settings, stage: str, graphdef: Any, trainable: nnx.State,
                   shardings: nnx.State, mesh: jax.sharding.Mesh) -> StageStep:
  """The jitted, donating train step of `stage` (also used by ir_jax.aot).

  `trainable` may be abstract; optimizer-state leaves shaped like a parameter
  follow that parameter's sharding, the rest are replicated.
  """
  sc = s.train.stage(stage)
  tr_sh, fr_sh = nnx.split_state(shardings, steps.TRAINABLE[stage], ...)
  tx = steps.optimizer(sc)
  abs_opt = jax.eval_shape(tx.init, trainable)
  rep = sh.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s_: s_, abs_opt, tr_sh,
                                 transform_non_params=lambda _: rep)
  loss_fn = steps.stage_loss_fn(stage, sc, s.routing, s.train.seed)
  batch_sh = jax.sharding.NamedSharding(mesh, sh.batch_spec(2))
  fn = jax.jit(sh.with_mesh(steps.make_train_step(graphdef, loss_fn, tx), mesh),
               in_shardings=(tr_sh, opt_sh, fr_sh, batch_sh, rep),
               out_shardings=(tr_sh, opt_sh, rep), donate_argnums=(0, 1))
  return StageStep(fn, tx, abs_opt, opt_sh, tr_sh, fr_sh)


# ------------------------------------------------------------ evaluation
def evaluate(s: Settings, ms: ModelState, mesh: jax.sharding.Mesh,
             num_batches: int) -> dict[str, Any]:
  """Held-out perplexity, dense and routed at the configured policy and sparsity."""
  data = s.data
  eval_spec = trained_spec(nnx.merge(ms.graphdef, ms.state), s.routing.inference())
  results: dict[str, Any] = {"split": data.eval_split, "seq_len": data.seq_len,
                             "policy": eval_spec.policy, "sparsity": eval_spec.sparsity,
                             "capacity_table": eval_spec.capacities is not None}
  for name, spec in (("dense", None), ("routed", eval_spec)):
    fn = jit_eval_step(ms.graphdef, ms.shardings, spec, mesh)
    it = pipeline.make_iterator(data, data.eval_split, mode=PACK, shuffle=False, num_epochs=1,
                                mesh=mesh, batch_axes=sh.BATCH_AXES, num_batches=num_batches,
                                prepare_if_missing=True)
    nll, tokens, execs = 0.0, 0.0, []
    try:
      for batch in it:
        out = jax.device_get(fn(ms.state, batch))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
        if "exec_rate" in out:
          execs.append(np.asarray(out["exec_rate"]) * float(out["tokens"]))
    finally:
      it.close()
    if not tokens:
      raise DataError(f"the {data.eval_split!r} split gave no tokens to evaluate; raise "
                      "data.validation_fraction")
    rec = {"nll": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": int(tokens)}
    if execs:
      rate = np.sum(execs, axis=0) / tokens
      rec["realized_sparsity"] = float(1.0 - rate.mean())
      rec["sparsity_attn"], rec["sparsity_mlp"] = (float(1.0 - rate[:, 0].mean()),
                                                   float(1.0 - rate[:, 1].mean()))
    results[name] = rec
  return results


# ------------------------------------------------------------ the stage loop
class _StopFlag:
  def __init__(self) -> None:
    self.set = False
    self._old = None

  def install(self) -> None:
    def handler(signum, frame):
      self.set = True
      log("ir_jax.train: SIGTERM received; saving a checkpoint before exiting")

    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. under some test runners)
      self._old = None

  def uninstall(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def check_batch(s: Settings, mesh: jax.sharding.Mesh) -> None:
  """Batch sizes that the data axes of the mesh (and the processes) divide."""
  shards = sh.mesh_axis_size(mesh, sh.BATCH_AXES)
  for stage in s.train.stage_list:
    b = s.stage_data(stage).batch_size
    where = f"train.{stage}.batch_size" if s.train.stage(stage).batch_size else "data.batch_size"
    if b % shards:
      raise ConfigError(f"{where}={b} is not divisible by the {shards} data shards of the mesh "
                        f"(data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a "
                        f"multiple of {shards}")
    if b % jax.process_count():
      raise ConfigError(f"{where}={b} is not divisible by the {jax.process_count()} processes")


def train_stage(s: Settings, stage: str, ms: ModelState, mesh: jax.sharding.Mesh, workdir: str,
                writer: MetricWriter, stop: _StopFlag,
                should_stop: Callable[[str, int], bool] | None) -> dict[str, Any]:
  sc = s.train.stage(stage)
  total = sc.steps * sc.grad_accum  # batches
  data_cfg = s.stage_data(stage)
  sdir = stage_dir(workdir, stage)
  mgr = _manager(sdir, s.train.keep_checkpoints, s.train.async_checkpoints)
  adapters_target = adapter_target(ms)
  trainable_type = steps.TRAINABLE[stage]
  graphdef, trainable, frozen = nnx.split(nnx.merge(ms.graphdef, ms.state), trainable_type, ...)
  lazy: dict[str, Any] = {}  # iterator and compiled step, built only when training is left

  def prepare() -> tuple[Any, Any]:
    if not lazy:
      lazy["it"] = pipeline.train_iterator(data_cfg, mesh=mesh, batch_axes=sh.BATCH_AXES,
                                           prepare_if_missing=True)
      lazy["built"] = jit_stage_step(s, stage, graphdef, trainable, ms.shardings, mesh)
    return lazy["it"], lazy["built"]

  def restore(n: int) -> dict[str, Any]:
    if n >= total:  # a finished stage: its adapters are all that is needed
      return restore_compat(lambda tgt: mgr.restore(n, args=ocp.args.Composite(
          adapters=ocp.args.StandardRestore(tgt), meta=ocp.args.JsonRestore())), adapters_target)
    it_, built_ = prepare()
    return restore_compat(lambda tgt: mgr.restore(n, args=ocp.args.Composite(
        adapters=ocp.args.StandardRestore(tgt),
        opt_state=ocp.args.StandardRestore(sh.with_shardings(built_.abs_opt, built_.opt_sh)),
        data=_grain_restore(it_), meta=ocp.args.JsonRestore())), adapters_target)

  t0 = time.time()
  on_disk = list(mgr.all_steps())
  try:
    found = _restore_whole(mgr, sdir, restore, quarantine=True)
  except BaseException:
    if lazy:
      lazy["it"].close()
    mgr.close()
    raise
  if found is not None and any(n > found[0] for n in on_disk):  # newer, damaged steps moved
    _barrier(f"quarantine-{stage}")
    mgr.close()
    mgr = _manager(sdir, s.train.keep_checkpoints, s.train.async_checkpoints)
  latest, restored = found if found is not None else (None, None)
  if latest is not None and latest >= total:
    replace_adapters(ms, restored["adapters"])
    if lazy:
      lazy["it"].close()
    mgr.close()
    log(f"[{stage}] already finished ({latest} batches); restored its result")
    return {"stage": stage, "resumed_from": latest, "steps_run": 0,
            "train_s": float((restored["meta"] or {}).get("train_s", 0.0))}

  it, built = prepare()
  tx, opt_sh, tr_sh, fr_sh = built.tx, built.opt_sh, built.tr_sh, built.fr_sh
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)

  start, prior_s = 0, 0.0
  t_begin = time.time()
  fitted = False
  if latest is not None:
    prior_s = float((restored["meta"] or {}).get("train_s", 0.0))
    replace_adapters(ms, restored["adapters"])
    graphdef, trainable, frozen = nnx.split(nnx.merge(ms.graphdef, ms.state), trainable_type, ...)
    opt_state = restored["opt_state"]
    start = latest
    log(f"[{stage}] resumed from batch {latest} ({time.time() - t0:.1f}s)")
  elif getattr(sc, "init", "none") == "fit":
    model = nnx.merge(graphdef, trainable, frozen)
    fit_info = stage_init(s, stage, model, it)
    writer.write(stage, 0, fit_info)
    _, trainable, frozen = nnx.split(model, trainable_type, ...)
    trainable, frozen = jax.device_put(trainable, tr_sh), jax.device_put(frozen, fr_sh)
    fitted = True
  elif stage == "router" and sc.prior_bias:
    trainable = _prior_router_bias(trainable, s.routing, tr_sh)
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  log(f"[{stage}] training {n_train:,} parameters ({trainable_type.__name__}) for {sc.steps} "
      f"steps x {sc.grad_accum} batch(es) of {data_cfg.batch_size} x {data_cfg.seq_len} tokens")
  step_fn = built.fn
  sched = steps.schedule(sc)
  tokens_per_batch = data_cfg.batch_size * data_cfg.seq_len

  pending: list[int] = []  # saved steps still without an integrity record

  def record_pending() -> None:
    with _checkpoint_write(sdir, pending[0] if pending else None):
      mgr.wait_until_finished()  # orbax waits for a running save before the next one anyway
      while pending:
        step_ = pending.pop(0)
        # orbax logs, rather than raises, some failures of an asynchronous commit.
        if not os.path.isdir(os.path.join(sdir, str(step_))):
          raise model_ckpt.CheckpointError(
              f"checkpoint step {step_} in {sdir} was not committed (its write failed; see the "
              "log above); rerun the same command to resume from the newest complete one")
        _record(mgr, sdir, step_)

  def save(step: int) -> None:
    record_pending()
    adapters, _ = nnx.split_state(nnx.merge_state(trainable, frozen), steps.ADAPTERS, ...)
    # train_s: wall seconds spent in this stage's steps so far, over all resumes.
    meta = {"stage": stage, "step": step, "total": total, "config": s.raw,
            "train_s": round(prior_s + time.time() - t_begin, 3)}
    with _checkpoint_write(sdir, step):
      mgr.save(step, args=ocp.args.Composite(
          adapters=ocp.args.StandardSave(adapters), opt_state=ocp.args.StandardSave(opt_state),
          data=_grain_save(it), meta=ocp.args.JsonSave(meta)), force=True)
    pending.append(step)

  def finish() -> None:
    nonlocal trainable, frozen
    if stage == "forecaster" and s.train.eval_batches:
      held = pipeline.make_iterator(s.data, s.data.eval_split, mode=PACK, shuffle=False,
                                    num_epochs=1, mesh=mesh, batch_axes=sh.BATCH_AXES,
                                    num_batches=min(4, s.train.eval_batches),
                                    prepare_if_missing=True)
      try:
        batches = list(held)
      finally:
        held.close()
      if batches:
        info = forecaster_report(nnx.merge(graphdef, trainable, frozen), batches,
                                 os.path.join(workdir, "forecasters.json"))
        writer.write(f"{stage}_heldout", total, info)  # not the step's own (stage, step) record
    if stage == "router" and sc.calibration_batches:
      log(f"[router] calibrating causal-mode thresholds on {sc.calibration_batches} batches ...")
      model = nnx.merge(graphdef, trainable, frozen)
      from jax.experimental import multihost_utils

      cal = [np.asarray(multihost_utils.process_allgather(next(it)["inputs"], tiled=True))
             for _ in range(sc.calibration_batches)]
      calibrate_thresholds(model, cal, trained_spec(model, s.routing.inference()))
      _, trainable, frozen = nnx.split(model, trainable_type, ...)
      frozen = jax.device_put(frozen, fr_sh)

  if fitted:  # the fit is a resume point of its own (it took a pass over the data)
    if total == 0:
      finish()
    save(0)
  t_last = time.time()
  n_last = start
  first_loss = last_loss = None
  step = start
  try:
    while step < total:
      batch = next(it)
      trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                              jnp.asarray(step, jnp.int32))
      step += 1
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        last = mgr.latest_step()
        raise TrainingError(
            f"[{stage}] loss is {loss} at step {step}; stopping. The last good checkpoint is "
            f"{'batch ' + str(last) if last is not None else 'none (no checkpoint yet)'} of "
            f"stage {stage}; lower train.{stage}.learning_rate or check the data")
      first_loss = loss if first_loss is None else first_loss
      last_loss = loss
      if step % s.train.log_every == 0 or step == total:
        now = time.time()
        dt = (now - t_last) / max(step - n_last, 1)
        vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
        vals.update(lr=float(sched(min((step - 1) // sc.grad_accum, sc.steps - 1))),
                    step_time_s=dt, tokens_per_s=tokens_per_batch / dt)
        writer.write(stage, step, vals)
        log(console_line(stage, step, total, vals))
        t_last, n_last = now, step
      if step == total:
        finish()
      stop_now = stop.set or (should_stop is not None and should_stop(stage, step))
      if step % s.train.checkpoint_every == 0 or step == total or stop_now:
        save(step)
      if stop_now and step < total:
        record_pending()
        raise Preempted(stage, step)
    record_pending()
  except BaseException:
    it.close()
    with contextlib.suppress(Exception):  # a failed write raises again here; report the first
      mgr.close()
    raise
  it.close()
  mgr.close()
  ms.state = nnx.state(nnx.merge(graphdef, trainable, frozen))
  return {"stage": stage, "resumed_from": start, "steps_run": step - start,
          "train_s": round(prior_s + time.time() - t_begin, 3),
          "first_loss": first_loss, "last_loss": last_loss}


def _prior_router_bias(trainable: nnx.State, routing: RoutingSpec, shardings: nnx.State) -> nnx.State:
  """Untrained routers (output bias exactly 0) start at the target execute rate.

  Gumbel gates execute with probability sigmoid(score); a bias of
  logit(capacity) makes fresh routers execute the target fraction from step
  one, so the sparsity penalty does not dominate the first steps. Top-k and
  threshold routing are unchanged by a constant shift. Routers trained before
  (non-zero bias) are left alone.
  """
  cap = 1.0 - routing.sparsity if routing.capacities is None else float(
      np.mean(routing.capacities))
  cap = min(max(cap, 1e-3), 1 - 1e-3)
  prior = math.log(cap / (1.0 - cap))
  flat = dict(nnx.to_flat_state(trainable))
  changed = False
  for path, var in flat.items():
    if path[-1] == "b2" and path[-2].endswith("_router"):
      value = var[...]
      if not np.any(np.asarray(jax.device_get(value))):
        var[...] = jnp.full(value.shape, prior, value.dtype)
        changed = True
  if changed:
    log(f"[router] fresh routers: output bias set to logit({cap:.2f}) = {prior:.3f}")
    trainable = jax.device_put(trainable, shardings)
  return trainable


def _grain_save(it: Any) -> Any:
  import grain.checkpoint as gcp

  return gcp.CheckpointSave(it)


def _grain_restore(it: Any) -> Any:
  import grain.checkpoint as gcp

  return gcp.CheckpointRestore(it)


# ------------------------------------------------------------ the run
def run(s: Settings, workdir: str, *, should_stop: Callable[[str, int], bool] | None = None,
        devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Trains every stage of `s` in `workdir` (resuming), then evaluates; returns a summary.

  `should_stop(stage, step)` returning True stops like SIGTERM does: save, then
  raise `Preempted`. `devices` restricts the mesh (default: all devices).
  """
  workdir = os.path.abspath(workdir)
  mesh = sh.make_mesh(s.mesh, devices)  # ConfigError when it does not divide the devices
  check_batch(s, mesh)
  old = check_workdir(workdir, s)
  base = resolve_base(s, workdir) if old is None else dict(old["base"])
  check_data_ready(s)  # before the workdir exists: a refused run leaves nothing behind
  if jax.process_index() == 0 and old is None:
    os.makedirs(workdir, exist_ok=True)
    meta = {"format": RUN_FORMAT, "version": RUN_VERSION, "model": s.model.to_dict(),
            "base": base, "seed": s.train.seed, "stages": list(s.train.stage_list),
            "init_from": os.path.abspath(s.train.init_from) if s.train.init_from else "",
            "config": s.raw}
    tmp = os.path.join(workdir, RUN_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, default=str)
    os.replace(tmp, os.path.join(workdir, RUN_FILE))
  _barrier("run_json")
  log(f"ir_jax.train: {jax.device_count()} {jax.devices()[0].platform} device(s), mesh "
      f"{dict(mesh.shape)}, workdir {workdir}")

  t0 = time.time()
  ms = init_state(s.model, mesh, base, s.train.seed)
  if s.train.init_from:
    other = run_result(s.train.init_from, mesh)
    adapters, _ = nnx.split_state(other.state, steps.ADAPTERS, ...)
    mine, _ = split_adapters(ms)
    have = _paths(nnx.to_pure_dict(adapters))
    merged = {}
    for p, v in _paths(nnx.to_pure_dict(mine)).items():
      src = have.get(p)
      _set_path(merged, p, src if src is not None and src.shape == v.shape else v)
    nnx.replace_by_pure_dict(mine, merged)
    replace_adapters(ms, mine)
    log(f"initialised forecasters/routers/LoRA from {s.train.init_from}")
  log(f"model state ready in {time.time() - t0:.1f}s")

  writer = MetricWriter(workdir, enabled=jax.process_index() == 0,
                        tensorboard=s.train.tensorboard)
  stop = _StopFlag()
  stop.install()
  summary: dict[str, Any] = {"workdir": workdir, "stages": []}
  try:
    for stage in s.train.stage_list:
      t_stage = time.time()
      info = train_stage(s, stage, ms, mesh, workdir, writer, stop, should_stop)
      info["wall_s"] = round(time.time() - t_stage, 2)
      summary["stages"].append(info)
  finally:
    stop.uninstall()
    writer.close()
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "train_summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"stages": summary["stages"]}, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "train_summary.json"))
  if s.train.eval_batches:
    log(f"evaluating held-out perplexity, dense and routed, on {s.train.eval_batches} batches "
        f"of {s.data.batch_size} x {s.data.seq_len} tokens ...")
    t_eval = time.time()
    ev = evaluate(s, ms, mesh, s.train.eval_batches)
    ev["wall_s"] = round(time.time() - t_eval, 2)
    summary["eval"] = ev
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(ev, f, indent=2)
    _closing(workdir, ms, ev)
    d, r = ev["dense"], ev["routed"]
    log(f"held-out perplexity ({d['tokens']} tokens of {ev['split']!r}): dense "
        f"{d['perplexity']:.3f}  routed ({ev['policy']}, sparsity {ev['sparsity']}) "
        f"{r['perplexity']:.3f}  realized sparsity {r['realized_sparsity']:.3f}")
  else:
    _closing(workdir, ms, None)
  summary["state"] = ms
  return summary


def _closing(workdir: str, ms: Any, ev: dict[str, Any] | None) -> None:
  """summary.png and where the results are (process 0); the perplexity line comes last."""
  if jax.process_index() != 0:
    return
  table = model_table(nnx.merge(ms.graphdef, ms.state))
  figure = report.write_summary_figure(workdir, None if table is None else np.asarray(table), ev)
  for line in report.closing_lines(workdir, ev, figure):
    log(line)
