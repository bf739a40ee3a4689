"""The steps of ir_jax.train jitted for a mesh, and the held-out evaluation that runs them.

ir_jax.train.steps defines what a step computes; this module fixes how it runs
on a mesh (shardings of every argument, donation). ir_jax.aot compiles these
same functions ahead of time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from ir_jax import sharding as sh
from ir_jax.bootstrap import DocumentTally, ratio_interval
from ir_jax.data import pipeline
from ir_jax.data.config import DataError
from ir_jax.data.packing import PACK
from ir_jax.distributed import host_array
from ir_jax.nll import perplexity
from ir_jax.progress import counter, doing
from ir_jax.routing import RoutingSpec, flops, trained_spec
from ir_jax.rundir.state import ModelState
from ir_jax.train import steps
from ir_jax.train.config import Settings
from ir_jax.train.stages import STAGES


def jit_eval_step(
  graphdef: Any, shardings: nnx.State, spec: RoutingSpec | None, mesh: jax.sharding.Mesh
) -> Any:
  """eval(state, batch) jitted for `mesh`: dense when `spec` is None (also used by ir_jax.aot)."""
  return jax.jit(
    sh.with_mesh(steps.make_eval_step(graphdef, spec), mesh),
    in_shardings=(shardings, jax.sharding.NamedSharding(mesh, sh.batch_spec(2))),
    out_shardings=sh.replicated(mesh),
  )


@dataclasses.dataclass
class StageStep:
  """A stage's jitted train step and the shardings and optimizer it was built with."""

  fn: Any  # (trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics)
  tx: optax.GradientTransformation
  abs_opt: Any  # optimizer state as ShapeDtypeStructs
  opt_sh: Any
  tr_sh: nnx.State
  fr_sh: nnx.State


def jit_stage_step(
  s: Settings,
  stage: str,
  graphdef: Any,
  trainable: nnx.State,
  shardings: nnx.State,
  mesh: jax.sharding.Mesh,
) -> StageStep:
  """The jitted, donating train step of `stage` (also used by ir_jax.aot).

  `trainable` may be abstract; optimizer-state leaves shaped like a parameter
  follow that parameter's sharding, the rest are replicated.
  """
  stage_cfg = s.train.stage(stage)
  row = STAGES[stage]
  tr_sh, fr_sh = nnx.split_state(shardings, row.trainable, ...)
  tx = steps.optimizer(stage_cfg)
  abs_opt = jax.eval_shape(tx.init, trainable)
  rep = sh.replicated(mesh)
  opt_sh = optax.tree_map_params(
    tx, lambda _, s_: s_, abs_opt, tr_sh, transform_non_params=lambda _: rep
  )
  loss_fn = row.loss_fn(s)
  batch_sh = jax.sharding.NamedSharding(mesh, sh.batch_spec(2))
  fn = jax.jit(
    sh.with_mesh(steps.make_train_step(graphdef, loss_fn, tx), mesh),
    in_shardings=(tr_sh, opt_sh, fr_sh, batch_sh, rep),
    out_shardings=(tr_sh, opt_sh, rep),
    donate_argnums=(0, 1),
  )
  return StageStep(fn, tx, abs_opt, opt_sh, tr_sh, fr_sh)


def _split_batches(it: pipeline.DataIterator) -> int:
  """Batches one pass over `it`'s split takes: the most any process's shard needs."""
  n = it.local_batch_count()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    n = int(np.max(multihost_utils.process_allgather(np.int32(n))))
  return n


def evaluate(
  s: Settings, model_state: ModelState, mesh: jax.sharding.Mesh, num_batches: int
) -> dict[str, Any]:
  """Held-out perplexity, dense and routed at the configured policy and sparsity."""
  data = s.data
  model = nnx.merge(model_state.graphdef, model_state.state)
  eval_spec = trained_spec(model, s.routing.inference(), seq_len=data.seq_len)
  results: dict[str, Any] = {
    "split": data.eval_split,
    "seq_len": data.seq_len,
    "doc_tokens": s.train.eval_doc_tokens,
    "policy": eval_spec.policy,
    "sparsity": eval_spec.sparsity,
    "flops_budget": eval_spec.flops,
    "capacity_table": eval_spec.capacities is not None,
    "flops_fraction": flops(model.config, eval_spec, data.seq_len)["executed_fraction"],
  }
  docs: dict[str, DocumentTally] = {}
  for name, spec in (("dense", None), ("routed", eval_spec)):
    fn = jit_eval_step(model_state.graphdef, model_state.shardings, spec, mesh)
    it = pipeline.make_iterator(
      data,
      data.eval_split,
      mode=PACK,
      # Documents in a fixed shuffled order (data.seed; the same for both passes): the
      # first batches of a split in file order can be a handful of long documents.
      shuffle=True,
      num_epochs=1,
      mesh=mesh,
      batch_axes=sh.BATCH_AXES,
      num_batches=num_batches,
      prepare_if_missing=True,
      max_doc_tokens=s.train.eval_doc_tokens,
    )
    if name == "dense":  # the batches the split holds, so the bar ends where the data does
      num_batches = min(num_batches, _split_batches(it))
    nll, tokens, execs = 0.0, 0.0, []
    tally = DocumentTally()
    bar = counter(f"  {name} pass", num_batches, unit="batches")
    done = 0
    try:
      for i, batch in enumerate(it):
        # the first batch waits for the compile: nothing to count until it is done
        with doing(f"compiling the {name} evaluation" if i == 0 else f"evaluating {name}"):
          out = jax.device_get(fn(model_state.state, batch))
        if not float(out["tokens"]):  # every process's share of the split is used up
          break
        bar(i + 1)
        tally.add(
          host_array(out["nll_BxT"]),
          host_array(batch["loss_mask"]),
          host_array(batch["segment_ids"]),
        )
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
        if "exec_rate" in out:
          execs.append(np.asarray(out["exec_rate"]) * float(out["tokens"]))
        done = i + 1
      if done < num_batches:  # the split ended first
        bar(done, max(done, 1))
    finally:
      it.close()
    if not tokens:
      raise DataError(
        f"the {data.eval_split!r} split gave no tokens to evaluate; raise data.validation_fraction"
      )
    rec = {"nll": nll / tokens, "perplexity": perplexity(nll, tokens), "tokens": int(tokens)}
    if execs:
      rate = np.sum(execs, axis=0) / tokens
      rec["realized_sparsity"] = float(1.0 - rate.mean())
      rec["sparsity_attn"], rec["sparsity_mlp"] = (
        float(1.0 - rate[:, 0].mean()),
        float(1.0 - rate[:, 1].mean()),
      )
    results[name] = rec
    docs[name] = tally
  # x dense with a 95% bootstrap interval over the documents of the scored rows
  ratio, lo, hi = ratio_interval(docs["routed"].nll, docs["dense"].nll, docs["dense"].tokens)
  results["routed"].update(ratio=ratio, ci_low=lo, ci_high=hi, documents=len(docs["dense"].nll))
  return results
