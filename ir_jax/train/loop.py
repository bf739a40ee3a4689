"""The training run: stages in order on one mesh, each resumable, then the final eval.

Rerunning the same command resumes: finished stages are restored from their
last checkpoint, an interrupted stage continues from its newest checkpoint
with the optimizer state and the data stream exactly where they were. The
workdir layout is in ir_jax.train.rundir.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ir_jax import checkpoint as model_ckpt
from ir_jax import sharding as sh
from ir_jax.config import ConfigError
from ir_jax.data import pipeline
from ir_jax.files import write_json
from ir_jax.progress import doing
from ir_jax.routing import model_table
from ir_jax.train import checkpoints, report, rundir, steps
from ir_jax.train.config import Settings
from ir_jax.train.metrics import MetricWriter, console_line, log
from ir_jax.train.stages import STAGES, HookContext, stage_settings
from ir_jax.train.state import (
  ModelState,
  adapter_target,
  adopt_adapters,
  init_state,
  replace_adapters,
)
from ir_jax.train.stepfns import evaluate, jit_stage_step


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss); the message names the step."""


class Preempted(Exception):
  """A stop was requested (SIGTERM or `should_stop`); a checkpoint was saved first."""

  def __init__(self, stage: str, step: int) -> None:
    super().__init__(
      f"stopped at {stage} step {step} after saving a checkpoint; rerun the same command to resume"
    )
    self.stage, self.step = stage, step


# ------------------------------------------------------------ the stage loop
class _StopFlag:
  def __init__(self) -> None:
    self.set = False
    self._old = None

  def install(self) -> None:
    def handler(signum, frame):
      self.set = True
      # Every process says so (log() is process 0's): a signal may reach one host only.
      who = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""
      print(f"ir_jax.train: SIGTERM received{who}; saving a checkpoint before exiting", flush=True)

    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. under some test runners)
      self._old = None

  def uninstall(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def agreed_stop(flag: bool) -> bool:
  """True on every process when `flag` is True on any: one stop decision per step.

  A SIGTERM (a maintenance event, a preemption notice) may reach one host only, or
  reach hosts at different steps; a host that stopped alone would leave the others
  waiting in the next step's collectives. Every process calls this once per step, so
  all see the same answer at the same step and save that step together. With one
  process it is `flag` itself (no collective).
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def check_same_steps(steps_on_disk: list[int], directory: str) -> None:
  """Refuses (CheckpointError) when the processes see different checkpoint steps in
  `directory`: each would restore its own newest step and the job would continue from
  mixed states (or hang); a multi-process run needs one filesystem shared by all hosts."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  mine = np.asarray([max(steps_on_disk, default=-1), len(steps_on_disk)], np.int64)
  seen = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 2]
  if (seen != seen[0]).any():
    views = ", ".join(
      f"process {i}: {'none' if n < 0 else f'newest {n} of {c}'}" for i, (n, c) in enumerate(seen)
    )
    raise model_ckpt.CheckpointError(
      f"{directory}: the processes see different checkpoints ({views}); the workdir must "
      "be one filesystem shared by every host"
    )


def check_batch(s: Settings, mesh: jax.sharding.Mesh) -> None:
  """Batch sizes that the data axes of the mesh (and the processes) divide."""
  shards = sh.mesh_axis_size(mesh, sh.BATCH_AXES)
  for stage in s.train.stage_list:
    b = s.stage_data(stage).batch_size
    where = f"train.{stage}.batch_size" if s.train.stage(stage).batch_size else "data.batch_size"
    if b % shards:
      raise ConfigError(
        f"{where}={b} is not divisible by the {shards} data shards of the mesh "
        f"(data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a "
        f"multiple of {shards}"
      )
    if b % jax.process_count():
      raise ConfigError(f"{where}={b} is not divisible by the {jax.process_count()} processes")


def train_stage(
  s: Settings,
  stage: str,
  model_state: ModelState,
  mesh: jax.sharding.Mesh,
  workdir: str,
  writer: MetricWriter,
  stop: _StopFlag,
  should_stop: Callable[[str, int], bool] | None,
) -> dict[str, Any]:
  """Trains `stage` into `ms` (from its newest whole checkpoint, if any); returns its record.

  A stage already finished is only restored. Stops by saving a checkpoint and
  raising `Preempted`; a non-finite loss raises `TrainingError`.
  """
  stage_cfg = s.train.stage(stage)
  total = stage_cfg.steps * stage_cfg.grad_accum  # batches
  data_cfg = s.stage_data(stage)
  sdir = rundir.stage_dir(workdir, stage)
  mgr = checkpoints.open_manager(sdir, s.train.keep_checkpoints, s.train.async_checkpoints)
  adapters_target = adapter_target(model_state)
  row = STAGES[stage]
  trainable_type = row.trainable
  graphdef, trainable, frozen = nnx.split(
    nnx.merge(model_state.graphdef, model_state.state), trainable_type, ...
  )
  lazy: dict[str, Any] = {}  # iterator and compiled step, built only when training is left

  def prepare() -> tuple[Any, Any]:
    if not lazy:
      with doing(f"[{stage}] opening the training data"):
        lazy["it"] = pipeline.train_iterator(
          data_cfg, mesh=mesh, batch_axes=sh.BATCH_AXES, prepare_if_missing=True
        )
      lazy["built"] = jit_stage_step(s, stage, graphdef, trainable, model_state.shardings, mesh)
    return lazy["it"], lazy["built"]

  def restore(n: int) -> dict[str, Any]:
    if n >= total:  # a finished stage: its adapters are all that is needed
      return checkpoints.restore_compat(
        lambda tgt: mgr.restore(
          n,
          args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(tgt), meta=ocp.args.JsonRestore()
          ),
        ),
        adapters_target,
      )
    it_, built_ = prepare()
    return checkpoints.restore_compat(
      lambda tgt: mgr.restore(
        n,
        args=ocp.args.Composite(
          adapters=ocp.args.StandardRestore(tgt),
          opt_state=ocp.args.StandardRestore(sh.with_shardings(built_.abs_opt, built_.opt_sh)),
          data=checkpoints.grain_restore(it_),
          meta=ocp.args.JsonRestore(),
        ),
      ),
      adapters_target,
    )

  t0 = time.time()
  on_disk = list(mgr.all_steps())
  try:
    check_same_steps(on_disk, sdir)  # so that every process restores the same step
    if on_disk:
      log(f"[{stage}] restoring its newest checkpoint from {sdir} ...")
    with doing(f"[{stage}] restoring its checkpoint"):
      found = checkpoints.restore_whole(mgr, sdir, restore, quarantine=True)
  except BaseException:
    if lazy:
      lazy["it"].close()
    mgr.close()
    raise
  if found is not None and any(n > found[0] for n in on_disk):  # newer, damaged steps moved
    rundir.barrier(f"quarantine-{stage}")
    mgr.close()
    mgr = checkpoints.open_manager(sdir, s.train.keep_checkpoints, s.train.async_checkpoints)
  latest, restored = found if found is not None else (None, None)
  if latest is not None and latest >= total:
    replace_adapters(model_state, restored["adapters"])
    if lazy:
      lazy["it"].close()
    mgr.close()
    log(f"[{stage}] already finished ({latest} batches); restored its result")
    return {
      "stage": stage,
      "resumed_from": latest,
      "steps_run": 0,
      "train_s": float((restored["meta"] or {}).get("train_s", 0.0)),
    }

  it, built = prepare()

  def context(step: int) -> HookContext:
    return HookContext(s, stage_cfg, mesh, workdir, writer, it, step)

  tx, opt_sh, tr_sh, fr_sh = built.tx, built.opt_sh, built.tr_sh, built.fr_sh
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)

  start, prior_s = 0, 0.0
  t_begin = time.time()
  fitted = False
  if latest is not None:
    prior_s = float((restored["meta"] or {}).get("train_s", 0.0))
    replace_adapters(model_state, restored["adapters"])
    graphdef, trainable, frozen = nnx.split(
      nnx.merge(model_state.graphdef, model_state.state), trainable_type, ...
    )
    opt_state = restored["opt_state"]
    start = latest
    log(f"[{stage}] resumed from batch {latest} ({time.time() - t0:.1f}s)")
  elif row.fit is not None and getattr(stage_cfg, "init", "none") == "fit":
    model = nnx.merge(graphdef, trainable, frozen)
    with doing(f"[{stage}] closed-form start"):
      fit_info = row.fit(s, stage_cfg, model, it)
    writer.write(stage, 0, fit_info)
    _, trainable, frozen = nnx.split(model, trainable_type, ...)
    trainable, frozen = jax.device_put(trainable, tr_sh), jax.device_put(frozen, fr_sh)
    fitted = True
  elif row.start is not None:
    trainable = row.start(trainable, tr_sh, context(start))
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  log(
    f"[{stage}] training {n_train:,} parameters ({trainable_type.__name__}) for {stage_cfg.steps} "
    f"steps x {stage_cfg.grad_accum} batch(es) of {data_cfg.batch_size} x {data_cfg.seq_len} tokens"
  )
  if start < total and row.loss_doc:
    log(f"[{stage}] loss = {row.loss_doc}")
  step_fn = built.fn
  if row.routes_with_table and start < total:
    # Train under the routing evaluation uses: the capacity table as this stage's fit (the
    # router's allocates it), the stages before it or the restored checkpoint left it.
    # (The step built above only lent its optimizer shapes to the restore; never compiled.)
    route_s = stage_settings(s, stage, nnx.merge(graphdef, trainable, frozen))
    step_fn = jit_stage_step(route_s, stage, graphdef, trainable, model_state.shardings, mesh).fn
  sched = steps.schedule(stage_cfg)
  tokens_per_batch = data_cfg.batch_size * data_cfg.seq_len

  pending: list[int] = []  # saved steps still without an integrity record

  def record_pending() -> None:
    with checkpoints.writing(sdir, pending[0] if pending else None):
      mgr.wait_until_finished()  # orbax waits for a running save before the next one anyway
      while pending:
        step_ = pending.pop(0)
        # orbax logs, rather than raises, some failures of an asynchronous commit.
        if not os.path.isdir(os.path.join(sdir, str(step_))):
          raise model_ckpt.CheckpointError(
            f"checkpoint step {step_} in {sdir} was not committed (its write failed; see the "
            "log above); rerun the same command to resume from the newest complete one"
          )
        checkpoints.record_step(mgr, sdir, step_)

  def save(step: int) -> None:
    record_pending()
    adapters, _ = nnx.split_state(nnx.merge_state(trainable, frozen), steps.ADAPTERS, ...)
    # train_s: wall seconds spent in this stage's steps so far, over all resumes.
    meta = {
      "stage": stage,
      "step": step,
      "total": total,
      "config": s.raw,
      "train_s": round(prior_s + time.time() - t_begin, 3),
    }
    with checkpoints.writing(sdir, step):
      mgr.save(
        step,
        args=ocp.args.Composite(
          adapters=ocp.args.StandardSave(adapters),
          opt_state=ocp.args.StandardSave(opt_state),
          data=checkpoints.grain_save(it),
          meta=ocp.args.JsonSave(meta),
        ),
        force=True,
      )
    pending.append(step)

  def finish() -> None:
    nonlocal trainable, frozen
    if row.finish is not None:
      model = nnx.merge(graphdef, trainable, frozen)
      with doing(f"[{stage}] finishing the stage"):
        row.finish(model, context(total))
      _, trainable, frozen = nnx.split(model, trainable_type, ...)
      frozen = jax.device_put(frozen, fr_sh)

  if fitted:  # the fit is a resume point of its own (it took a pass over the data)
    if total == 0:
      finish()
    with doing(f"[{stage}] writing its checkpoint"):
      save(0)
  t_last = time.time()
  n_last = start
  first_loss = last_loss = None
  step = start
  try:
    while step < total:
      batch = next(it)
      first = step == start
      if first:  # compiling can take a minute on a large model; nothing to count
        log(f"[{stage}] compiling the train step (the first step waits for it) ...")
      with doing(f"[{stage}] compiling the train step" if first else f"[{stage}] training"):
        trainable, opt_state, metrics = step_fn(
          trainable, opt_state, frozen, batch, jnp.asarray(step, jnp.int32)
        )
        loss = float(metrics["loss"])
      step += 1
      if not math.isfinite(loss):
        last = mgr.latest_step()
        raise TrainingError(
          f"[{stage}] loss is {loss} at step {step}; stopping. The last good checkpoint is "
          f"{'batch ' + str(last) if last is not None else 'none (no checkpoint yet)'} of "
          f"stage {stage}; lower train.{stage}.learning_rate or check the data"
        )
      first_loss = loss if first_loss is None else first_loss
      last_loss = loss
      if step % s.train.log_every == 0 or step == total:
        now = time.time()
        dt = (now - t_last) / max(step - n_last, 1)
        vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
        vals.update(
          lr=float(sched(min((step - 1) // stage_cfg.grad_accum, stage_cfg.steps - 1))),
          step_time_s=dt,
          tokens_per_s=tokens_per_batch / dt,
        )
        writer.write(stage, step, vals)
        log(console_line(stage, step, total, vals))
        t_last, n_last = now, step
      if step == total:
        finish()
      stop_now = agreed_stop(stop.set or (should_stop is not None and should_stop(stage, step)))
      if step % s.train.checkpoint_every == 0 or step == total or stop_now:
        save(step)
      if stop_now and step < total:
        record_pending()
        raise Preempted(stage, step)
    with doing(f"[{stage}] writing its checkpoint"):
      record_pending()
  except BaseException:
    it.close()
    with contextlib.suppress(Exception):  # a failed write raises again here; report the first
      mgr.close()
    raise
  it.close()
  mgr.close()
  model_state.state = nnx.state(nnx.merge(graphdef, trainable, frozen))
  return {
    "stage": stage,
    "resumed_from": start,
    "steps_run": step - start,
    "train_s": round(prior_s + time.time() - t_begin, 3),
    "first_loss": first_loss,
    "last_loss": last_loss,
  }


# ------------------------------------------------------------ the run
def run(
  s: Settings,
  workdir: str,
  *,
  should_stop: Callable[[str, int], bool] | None = None,
  devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
  """Trains every stage of `s` in `workdir` (resuming), then evaluates; returns a summary.

  `should_stop(stage, step)` returning True stops like SIGTERM does: save, then
  raise `Preempted`. `devices` restricts the mesh (default: all devices).
  """
  workdir = os.path.abspath(workdir)
  mesh = sh.make_mesh(s.mesh, devices)  # ConfigError when it does not divide the devices
  check_batch(s, mesh)
  old = rundir.check_workdir(workdir, s)
  with doing("importing the base weights"):
    base = rundir.resolve_base(s, workdir) if old is None else dict(old["base"])
  rundir.check_data_ready(s)  # before the workdir exists: a refused run leaves nothing behind
  if jax.process_index() == 0 and old is None:
    rundir.write_run(workdir, s, base)
  rundir.barrier("run_json")
  log(
    f"ir_jax.train: {jax.device_count()} {jax.devices()[0].platform} device(s), mesh "
    f"{dict(mesh.shape)}, workdir {workdir}"
  )

  t0 = time.time()
  log("loading the model state onto the mesh (base weights, forecasters, routers) ...")
  with doing("loading the model state"):
    model_state = init_state(s.model, mesh, base, s.train.seed)
  if s.train.init_from:
    with doing(f"reading {s.train.init_from}"):
      adopt_adapters(model_state, rundir.run_result(s.train.init_from, mesh))
    log(f"initialised forecasters/routers/LoRA from {s.train.init_from}")
  log(f"model state ready in {time.time() - t0:.1f}s")

  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=s.train.tensorboard)
  stop = _StopFlag()
  stop.install()
  summary: dict[str, Any] = {"workdir": workdir, "stages": []}
  try:
    for stage in s.train.stage_list:
      t_stage = time.time()
      info = train_stage(s, stage, model_state, mesh, workdir, writer, stop, should_stop)
      info["wall_s"] = round(time.time() - t_stage, 2)
      summary["stages"].append(info)
  finally:
    stop.uninstall()
    writer.close()
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "train_summary.json"), {"stages": summary["stages"]}, indent=2)
  if s.train.eval_batches:
    log(
      f"evaluating held-out perplexity, dense and routed, on up to {s.train.eval_batches} "
      f"batches of {s.data.batch_size} x {s.data.seq_len} tokens"
      + (
        f" (each document's first {s.train.eval_doc_tokens} tokens)"
        if s.train.eval_doc_tokens
        else ""
      )
      + " ..."
    )
    t_eval = time.time()
    with doing("evaluating held-out perplexity"):
      ev = evaluate(s, model_state, mesh, s.train.eval_batches)
    ev["wall_s"] = round(time.time() - t_eval, 2)
    summary["eval"] = ev
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(ev, f, indent=2)
    _closing(workdir, model_state, ev)
    d, r = ev["dense"], ev["routed"]
    log(
      f"held-out perplexity ({d['tokens']} tokens of {ev['split']!r}): dense "
      f"{d['perplexity']:.3f}  routed ({ev['policy']}, "
      + (
        f"FLOPs budget {ev['flops_budget']:g}"
        if ev.get("flops_budget")
        else f"sparsity {ev['sparsity']}"
      )
      + f") {r['perplexity']:.3f}  {r['ratio']:.2f}x dense (95% CI {r['ci_low']:.2f}-"
      f"{r['ci_high']:.2f}, {r['documents']} documents)  executed FLOPs "
      f"{ev['flops_fraction']:.3f} of dense  realized sparsity {r['realized_sparsity']:.3f}"
    )
  else:
    _closing(workdir, model_state, None)
  summary["state"] = model_state
  return summary


def _closing(workdir: str, model_state: ModelState, ev: dict[str, Any] | None) -> None:
  """summary.png and where the results are (process 0); the perplexity line comes last."""
  if jax.process_index() != 0:
    return
  table = model_table(nnx.merge(model_state.graphdef, model_state.state))
  with doing("drawing summary.png"):
    figure = report.write_summary_figure(workdir, None if table is None else np.asarray(table), ev)
  for line in report.closing_lines(workdir, ev, figure):
    log(line)
