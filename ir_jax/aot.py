"""Ahead-of-time check that a config's jitted steps compile and fit a TPU slice.

  python -m ir_jax.aot --config configs/llama7b.py --topology v5e:4x4 [--stage router]
  python -m ir_jax.aot --config configs/tiny.py --topology cpu:8        # no libtpu needed
  python -m ir_jax.aot --config configs/llama7b.py --topology v5e:2x2 \
      --stage forecaster_stats,router_stats,error_curves               # the closed-form fits

Builds exactly the step `python -m ir_jax.train` runs (ir_jax.train.steps with
the shardings of ir_jax.train.stepfns / ir_jax.sharding), lowers it on abstract
inputs for the topology's devices and compiles it; nothing is allocated. TPU
topologies (`v4:2x2x2`, `v5e:4x4`, `v5p:2x2x2`, `v6e:4x4`, ...) need libtpu on
this machine (`pip install 'ir_jax[tpu]'`, a CPU machine is enough).

Per stage it prints per-chip memory from XLA (arguments, outputs, temporaries,
total vs the chip's HBM) and an estimated step time from *analytic* model
FLOPs at an assumed MFU: XLA's cost_analysis() counts a scanned layer body
once, so its FLOPs (and time estimate) are wrong for scanned models. Exit
status 1 when a stage does not fit, 2 on a user error.

The statistics passes of the closed-form fits (`forecaster_stats`,
`router_stats`, `error_curves`: ir_jax.fit's jitted dense passes, lowered
with the model state as training holds it and batches as the pipeline
yields them) are compiled the same way. Their records add what XLA's
figures leave out: how the statistics come out sharded, the running total
`ir_jax.fit.common._accumulate` keeps on device beside each new batch's
output, the per-chip copy a multi-host gather makes, and the host memory of
fetching them whole (float32) and converting them to float64 on every host.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from ir_jax import distributed
from ir_jax import sharding as sh
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.fit import forecasters as fit_forecasters
from ir_jax.fit import routers as fit_routers
from ir_jax.fit import tables as fit_tables
from ir_jax.fit.common import pass_context
from ir_jax.forecast import lff_flops, router_flops
from ir_jax.routing import RoutingSpec
from ir_jax.routing import flops as routed_flops
from ir_jax.routing.plan import prefill_plan
from ir_jax.train.config import Settings, settings_from_config
from ir_jax.train.stages import STAGES
from ir_jax.train.state import abstract_state
from ir_jax.train.stepfns import jit_eval_step, jit_stage_step

PROG = "ir_jax.aot"
AOT_STAGES = tuple(STAGES) + ("infer", "infer_dense")
# The closed-form fits' dense statistics passes (ir_jax.fit), by the training stage whose
# data (batch x seq_len) they read.
STATS_STAGES = {
  "forecaster_stats": "forecaster",  # fit.forecasters._forecaster_moments
  "router_stats": "router",  # fit.routers._router_moments
  "error_curves": "router",  # fit.tables._error_curves (allocation='error')
}
ALL_STAGES = AOT_STAGES + tuple(STATS_STAGES)
GIB = 1024**3
GB = 1e9
EXIT_DOES_NOT_FIT = 1


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: HBM and peak dense bf16 matmul throughput (public spec sheets)."""

  name: str
  hbm_bytes: float | None
  peak_flops: float | None
  chip_config: str = "default"  # libtpu's chip_config_name: megacore = one device per chip


CHIPS = {
  "v4": Chip("TPU v4", 32 * GIB, 275e12, "megacore"),
  "v5e": Chip("TPU v5e", 16 * GIB, 197e12),
  "v5p": Chip("TPU v5p", 95 * GIB, 459e12, "megacore"),
  "v6e": Chip("TPU v6e", 32 * GIB, 918e12),
}


@dataclasses.dataclass
class Target:
  """Devices to compile for, and what one of them can hold and do."""

  topology: str
  devices: list[Any]
  chip: Chip
  hosts: int


def target_devices(
  topology: str,
  chips_per_host: tuple[int, int, int] = (2, 2, 1),
  hbm_gib: float | None = None,
  peak_tflops: float | None = None,
) -> Target:
  """`cpu:N` (this machine's CPU devices) or a TPU topology `vX:AxB[xC]` via libtpu."""
  kind, _, shape = topology.partition(":")
  over = lambda c: dataclasses.replace(
    c,
    hbm_bytes=c.hbm_bytes if hbm_gib is None else hbm_gib * GIB,
    peak_flops=c.peak_flops if peak_tflops is None else peak_tflops * 1e12,
  )
  if kind == "cpu":
    try:
      n = int(shape)
    except ValueError:
      raise ConfigError(f"--topology {topology!r}: expected cpu:N with N a device count") from None
    devs = jax.devices("cpu")
    if not 1 <= n <= len(devs):
      raise ConfigError(
        f"--topology {topology}: this process has {len(devs)} CPU device(s); set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
      )
    return Target(topology, devs[:n], over(Chip("CPU", None, None)), 1)
  if kind not in CHIPS or not shape:
    raise ConfigError(
      f"--topology {topology!r}: expected cpu:N or one of "
      f"{sorted(CHIPS)} with a chip grid, e.g. v5e:4x4, v5p:2x2x2"
    )
  try:
    import libtpu  # noqa: F401  (only to give a clear message when it is missing)
  except ImportError:
    raise ConfigError(
      f"--topology {topology} needs libtpu (pip install 'ir_jax[tpu]', i.e. "
      "libtpu==0.0.42.*, the version jax 0.10.2 names); cpu:N works "
      "without it"
    ) from None
  from jax.experimental import topologies

  chip = over(CHIPS[kind])
  # libtpu looks for a TPU VM's metadata and worker list, and takes a machine-wide
  # lock file meant for processes that own real chips; none of that applies to a
  # compile-only topology on a CPU machine (and a stale lock would refuse the run).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=topology,
      chip_config_name=chip.chip_config,
      chips_per_host_bounds=chips_per_host,
      num_slices=1,
    )
  except (RuntimeError, ValueError) as e:  # libtpu's refusal of an unknown or malformed name
    msg = str(e).splitlines()[0]
    raise ConfigError(f"--topology {topology}: libtpu refused it ({msg})") from None
  devs = list(desc.devices)
  return Target(topology, devs, chip, len({d.process_index for d in devs}))


# ------------------------------------------------------------ analytic FLOPs
def _unit_ks(cfg: LlamaConfig, spec: RoutingSpec | None, t: int) -> list[tuple[int, int]]:
  """Tokens per row that run each layer's (attention, MLP) unit, as the forward computes
  (the routing plan's `tokens`)."""
  plan = prefill_plan(cfg, RoutingSpec(policy="dense") if spec is None else spec, t)
  return [(int(a), int(m)) for a, m in plan.tokens()]


def step_flops(
  cfg: LlamaConfig, stage: str, spec: RoutingSpec | None, batch: int, seq_len: int
) -> dict[str, float]:
  """Model FLOPs of one step of `stage` (matmuls, 2 per multiply-add), without remat recompute.

  Forward as `ir_jax.routing.flops` counts it (the forecaster stage never
  computes the LM head). Backward: an activation gradient through every
  frozen matmul on the path from the loss to the trained modules (1x its
  forward; attention scores and values 2x, both operands being activations)
  plus the weight gradients of the trained modules (1x their forward). The
  forecaster stage back-propagates only inside the forecasters.
  """
  b, t, L = batch, seq_len, cfg.num_layers
  d, h, k = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  # per query token: scores and weighted values over the (T + 1) / 2 keys a causal row
  # attends on average (as ir_jax.routing.flops counts them)
  core = 2 * (t + 1) / 2 * h * k * 2
  lff = lff_flops(cfg)
  if stage == "forecaster":
    dense = routed_flops(cfg, RoutingSpec(policy="dense"), t, b)["dense"]
    head = b * t * 2 * d * cfg.vocab_size
    fwd = dense - head + b * t * L * 2 * lff
    # Per LFF (W1 then W2, equal sizes): dW2, the hidden activation grad and dW1.
    bwd = b * t * L * 2 * 1.5 * lff
    return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}
  fl = routed_flops(cfg, spec if spec is not None else RoutingSpec(policy="dense"), t, b)
  fwd = fl["executed"]
  ks = _unit_ks(cfg, spec, t)
  core_fwd = b * sum(ka for ka, _ in ks) * core
  if stage == "infer":
    return {"forward": float(fwd), "backward": 0.0, "total": float(fwd)}
  if stage == "router":
    trained = b * t * L * 2 * router_flops(cfg)
    bwd = fwd + core_fwd + trained
  elif stage == "distill":
    # The dense teacher's forward, then the routed student's backward: activation
    # gradients through every layer and the forecasters' weight gradients (as above).
    bwd = fwd + core_fwd + b * t * L * 2 * 1.5 * lff
    fwd += routed_flops(cfg, RoutingSpec(policy="dense"), t, b)["dense"]
  elif stage == "lora":
    r, n, f = cfg.lora_rank, cfg.num_kv_heads, cfg.intermediate_size
    # v on every token (keys/values are computed for all); q and gate on executed tokens.
    lora = b * sum(
      t * 2 * (d * r + r * n * k) + ka * 2 * (d * r + r * h * k) + km * 2 * (d * r + r * f)
      for ka, km in ks
    )
    fwd += lora
    bwd = fwd + core_fwd + lora
  else:
    raise ValueError(f"unknown stage {stage!r}")
  return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


def stats_flops(cfg: LlamaConfig, stage: str, batch: int, seq_len: int) -> dict[str, float]:
  """Model FLOPs of one statistics pass (forward only): the dense layers without the LM head,
  plus per unit and token what the pass adds: forecaster_stats X^T X and X^T Y (2 d^2 each),
  router_stats the forecast and X^T X, error_curves the forecast and the router."""
  b, t, L, d = batch, seq_len, cfg.num_layers, cfg.hidden_size
  dense = routed_flops(cfg, RoutingSpec(policy="dense"), t, b)["dense"]
  fwd = dense - b * t * 2 * d * cfg.vocab_size
  per_unit = {
    "forecaster_stats": 2 * 2 * d * d,
    "router_stats": lff_flops(cfg) + 2 * d * d,
    "error_curves": lff_flops(cfg) + router_flops(cfg),
  }[stage]
  fwd += b * t * L * 2 * per_unit
  return {"forward": float(fwd), "backward": 0.0, "total": float(fwd)}


# ------------------------------------------------------------ the steps
@dataclasses.dataclass
class Built:
  """A jitted step and the abstract, sharded arguments it is lowered with."""

  fn: Any
  args: tuple[Any, ...]
  batch: int
  seq_len: int
  spec: RoutingSpec | None
  trained_params: int


def batch_structs(mesh: jax.sharding.Mesh, b: int, t: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What the data pipeline yields (ir_jax.data.packing), sharded over the batch axes."""
  bs = jax.sharding.NamedSharding(mesh, sh.batch_spec(2))
  dtypes = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "loss_mask": jnp.float32,
    "positions": jnp.int32,
    "segment_ids": jnp.int32,
  }
  return {name: jax.ShapeDtypeStruct((b, t), dt, sharding=bs) for name, dt in dtypes.items()}


def stage_settings(s: Settings, stage: str) -> Settings:
  """The settings a run training `stage` has (LoRA adapters exist only when lora is trained)."""
  if stage in STAGES and STAGES[stage].lora and not s.model.lora_rank:
    return s.with_lora_adapters()
  return s


def build_step(s: Settings, stage: str, mesh: jax.sharding.Mesh) -> Built:
  """The jitted train step of `stage` (as ir_jax.train.loop.train_stage builds it), or the
  routed (`infer`) / dense (`infer_dense`) eval step of ir_jax.train.stepfns.evaluate."""
  s = stage_settings(s, stage)
  graphdef, abs_state, shardings = abstract_state(s.model, mesh)
  rep = sh.replicated(mesh)
  if stage in ("infer", "infer_dense"):
    spec = None if stage == "infer_dense" else s.routing.inference()
    b, t = s.data.batch_size, s.data.seq_len
    fn = jit_eval_step(graphdef, shardings, spec, mesh)
    args = (sh.with_shardings(abs_state, shardings), batch_structs(mesh, b, t))
    return Built(fn, args, b, t, spec, 0)
  data_cfg = s.stage_data(stage)
  graphdef, trainable, frozen = nnx.split(
    nnx.merge(graphdef, abs_state), STAGES[stage].trainable, ...
  )
  st = jit_stage_step(s, stage, graphdef, trainable, shardings, mesh)
  fn, abs_opt, opt_sh, tr_sh, fr_sh = st.fn, st.abs_opt, st.opt_sh, st.tr_sh, st.fr_sh
  b, t = data_cfg.batch_size, data_cfg.seq_len
  args = (
    sh.with_shardings(trainable, tr_sh),
    sh.with_shardings(abs_opt, opt_sh),
    sh.with_shardings(frozen, fr_sh),
    batch_structs(mesh, b, t),
    jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
  )
  spec = STAGES[stage].spec(s)
  n_train = sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))
  return Built(fn, args, b, t, spec, n_train)


@dataclasses.dataclass
class _Pass:
  """A statistics pass of ir_jax.fit bound to its static arguments, lowered as it is called:
  `fn(model, batch, *static)`, traced in fit.common.pass_context as the fits trace it."""

  fn: Any
  static: tuple[Any, ...]

  def lower(self, model: Any, batch: Any) -> Any:
    with pass_context(model):
      return self.fn.lower(model, batch, *self.static)


def build_stats(s: Settings, stage: str, mesh: jax.sharding.Mesh) -> Built:
  """The jitted statistics pass `stage` of the closed-form fits, on the model state as the
  training run holds it when it fits (ir_jax.train.loop: the state with
  ir_jax.train.state.abstract_state's shardings, merged into one model) and one batch of
  its stage's data (`batch_structs`), traced in the context the run traces it in."""
  data_stage = STATS_STAGES[stage]
  s = stage_settings(s, data_stage)
  graphdef, abs_state, shardings = abstract_state(s.model, mesh)
  model = nnx.merge(graphdef, sh.with_shardings(abs_state, shardings))
  greedy = s.routing.policy == "greedy"  # as ir_jax.train.init decides
  # All three are traced on the model's mesh (fit.common._accumulate and
  # fit.tables.error_curves call them in fit.common.pass_context).
  if stage == "forecaster_stats":
    fn = _Pass(fit_forecasters._forecaster_moments, (s.train.forecaster.outlier,))
  elif stage == "router_stats":
    fn = _Pass(fit_routers._router_moments, (greedy,))
  else:
    fn = _Pass(fit_tables._error_curves, (greedy,))
  data_cfg = s.stage_data(data_stage)
  b, t = data_cfg.batch_size, data_cfg.seq_len
  return Built(fn, (model, batch_structs(mesh, b, t)), b, t, None, 0)


def _leaf_bytes(shape: tuple[int, ...], dtype: Any) -> int:
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def _chip_bytes(tree: Any) -> int:
  """Per-chip bytes of a tree of sharded ShapeDtypeStructs."""
  leaves = jax.tree.leaves(tree)
  return sum(_leaf_bytes(x.sharding.shard_shape(x.shape), x.dtype) for x in leaves)


def _spec(sharding: Any) -> str:
  spec = getattr(sharding, "spec", None)
  return "P()" if spec is None else str(spec).replace("PartitionSpec", "P")


def _gather_bytes(info: dict[str, Any], shardings: dict[str, Any]) -> tuple[int, str]:
  """(per-chip bytes XLA allocates, outputs + temporaries, for the largest single gather
  `ir_jax.distributed.host_array` makes across hosts; its description). host_array
  replicates on every chip one leading-axis block at a time (`distributed.layer_gather`)
  where `distributed.gathers_by_layer` says so, else the whole leaf (process_allgather's
  jitted identity); the same programs are compiled here."""

  def unit(k: str) -> int:
    size = _leaf_bytes(info[k].shape, info[k].dtype)
    by_layer = distributed.gathers_by_layer(info[k].shape, shardings[k])
    return size // info[k].shape[0] if by_layer else size

  k = max(sorted(info), key=unit)
  src = jax.ShapeDtypeStruct(info[k].shape, info[k].dtype, sharding=shardings[k])
  rep = jax.sharding.NamedSharding(shardings[k].mesh, jax.sharding.PartitionSpec())
  if distributed.gathers_by_layer(info[k].shape, shardings[k]):
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    lowered = distributed.layer_gather(shardings[k]).lower(src, index)
    what = f"one layer of {k}, {'x'.join(map(str, info[k].shape[1:]))}"
  else:
    lowered = jax.jit(lambda x: x, out_shardings=rep).lower(src)
    what = f"{k} whole, {'x'.join(map(str, info[k].shape))}"
  ma = lowered.compile().memory_analysis()
  return _stat(ma, "output_size_in_bytes") + _stat(ma, "temp_size_in_bytes"), what


def stats_memory(
  lowered: Any, compiled: Any, target: Target, accumulates: bool, batches: int
) -> dict[str, Any]:
  """What the statistics outputs of a compiled pass take: global and per chip (by the
  compiled output shardings), how each is sharded, and the copies around the pass.

  The jitted fits are `nnx.jit(graph_updates=False)` functions: they return the
  statistics (the first output) and the model variables the pass changed (none), not the
  model state, so XLA's output size is the statistics alone.

  Around the pass (ir_jax.fit.common._accumulate): the running total (one copy of the
  statistics per chip); the previous batch's output is added into it in place and
  dropped, so none is held beside the next pass (`held_output_gib` 0; it was one more
  copy). Then `host_array` per output leaf: across hosts, a gather that replicates on
  every chip one layer's block of the leaf at a time (`_gather_bytes`), and every host
  fetches the leaf whole (float32) and keeps a float64 copy. A pass that does not
  accumulate (error_curves) is fetched per batch in float32 and the `batches` batches'
  arrays are concatenated on the host (about twice their size).
  """
  inner = getattr(lowered, "lowered", lowered)
  info = inner.out_info[0]
  shardings = compiled.output_shardings[0]
  names = sorted(info)
  glob = {k: _leaf_bytes(info[k].shape, info[k].dtype) for k in names}
  chip = {k: _leaf_bytes(shardings[k].shard_shape(info[k].shape), info[k].dtype) for k in names}
  n = len(target.devices)
  split = {k: glob[k] // max(chip[k], 1) for k in names}
  big = [k for k in names if len(info[k].shape) > 2]  # [L, 2, d, ...]: the Gram matrices
  stats_g, stats_c = sum(glob.values()), sum(chip.values())
  largest = max(glob.values())
  total = stats_c if accumulates else 0
  multi = target.hosts > 1  # then host_array gathers across hosts
  gather, gathered = _gather_bytes(info, shardings) if multi else (0, "")
  rec = {
    "stats_shapes": {k: list(info[k].shape) for k in names},
    "stats_shardings": {k: _spec(shardings[k]) for k in names},
    "stats_split": split,
    "stats_sharded": all(split[k] == n for k in big) if big else None,
    "stats_gib": stats_g / GIB,
    "stats_chip_gib": stats_c / GIB,
    "running_total_gib": total / GIB,
    "held_output_gib": 0.0,  # _accumulate drops each output once it is added
    "gather_chip_gib": gather / GIB,
    "gathered": gathered,
    "host_fetch_gb": stats_g / GB,
    "host_float64_gb": 2 * stats_g / GB if accumulates else 0.0,
    "host_peak_gb": (2 * stats_g + largest if accumulates else 2 * stats_g * batches) / GB,
  }
  return rec


_UNITS = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}


def _oom(msg: str) -> tuple[float, float] | None:
  """(temporaries GiB, available GiB) from the TPU compiler's out-of-memory error, else None."""
  if "RESOURCE_EXHAUSTED" not in msg:
    return None
  m = re.search(r"temporaries \(([\d.]+)([KMGT])\).*?available HBM \(([\d.]+)([KMGT])\)", msg)
  if not m:
    return (float("nan"), float("nan"))
  return float(m[1]) * _UNITS[m[2]], float(m[3]) * _UNITS[m[4]]


def _stat(ma: Any, name: str) -> int:
  return int(getattr(ma, name, 0) or 0)


def check_stage(s: Settings, stage: str, target: Target, mfu: float) -> dict[str, Any]:
  """Compiles `stage` for `target`; per-chip memory, analytic FLOPs and estimated step time."""
  try:
    mesh = sh.make_mesh(s.mesh, target.devices)
  except NotImplementedError as e:  # mesh_utils cannot lay this mesh onto the chip torus
    raise ConfigError(
      f"mesh {s.mesh.describe()} does not map onto the {target.topology} torus "
      f"({str(e).splitlines()[0][:120]}...)"
    ) from None
  stats = stage in STATS_STAGES
  built = build_stats(s, stage, mesh) if stats else build_step(s, stage, mesh)
  shards = sh.mesh_axis_size(mesh, sh.BATCH_AXES)
  if built.batch % shards or built.batch % target.hosts:
    raise ConfigError(
      f"[{stage}] batch size {built.batch} is not divisible by the {shards} data "
      f"shards of mesh {dict(mesh.shape)} and the {target.hosts} hosts"
    )
  t0 = time.time()
  lowered = built.fn.lower(*built.args)
  hbm = target.chip.hbm_bytes
  cfg = stage_settings(s, stage).model
  if stats:
    fl = stats_flops(cfg, stage, built.batch, built.seq_len)
  else:
    fl = step_flops(
      cfg, "infer" if stage.startswith("infer") else stage, built.spec, built.batch, built.seq_len
    )
  chips = len(target.devices)
  tokens = built.batch * built.seq_len
  rec: dict[str, Any] = {
    "stage": stage,
    "topology": target.topology,
    "chip": target.chip.name,
    "chips": chips,
    "hosts": target.hosts,
    "mesh": dict(mesh.shape),
    "batch": built.batch,
    "per_host_batch": built.batch // target.hosts,
    "seq_len": built.seq_len,
    "trained_params": built.trained_params,
    "hbm_gib": hbm / GIB if hbm else None,
    "flops": fl["total"],
    "flops_forward": fl["forward"],
    "mfu": mfu,
  }
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program that cannot fit and says how much it needed.
    oom = _oom(str(e))
    if oom is None:
      raise
    rec.update(
      compile_s=round(time.time() - t0, 1),
      fits=False,
      oom=str(e).splitlines()[0],
      argument_gib=None,
      output_gib=None,
      alias_gib=None,
      code_gib=None,
      temp_gib=oom[0],
      total_gib=None,
      available_gib=oom[1],
    )
  else:
    ma = compiled.memory_analysis()
    arg, out = _stat(ma, "argument_size_in_bytes"), _stat(ma, "output_size_in_bytes")
    alias, temp = _stat(ma, "alias_size_in_bytes"), _stat(ma, "temp_size_in_bytes")
    code = _stat(ma, "generated_code_size_in_bytes")
    total = arg + out - alias + temp + code  # donated outputs reuse their arguments' buffers
    rec.update(
      compile_s=round(time.time() - t0, 1),
      argument_gib=arg / GIB,
      output_gib=out / GIB,
      alias_gib=alias / GIB,
      temp_gib=temp / GIB,
      code_gib=code / GIB,
      total_gib=total / GIB,
      fits=(total <= hbm) if hbm else None,
    )
    if stats:
      accumulates = stage != "error_curves"
      stage_cfg = s.train.stage(STATS_STAGES[stage])
      n_batches = stage_cfg.fit_batches if accumulates else stage_cfg.allocation_batches
      sm = stats_memory(lowered, compiled, target, accumulates, n_batches)
      chip_out = out / GIB
      # The whole model and batch stay on the chips; XLA's arguments leave out what a pass
      # does not read (the LM head, the routers of the moments passes, the batch's targets
      # and loss mask), which is added back.
      model_c = _chip_bytes(nnx.state(built.args[0])) / GIB
      unread = max(model_c + _chip_bytes(built.args[1]) / GIB - arg / GIB, 0.0)
      # On device while a batch's pass runs: the pass itself, the inputs it does not read
      # and the running total (the previous batch's output, held_output_gib, is no longer
      # kept: 0); while gathering across hosts: the model, the total and one gathered
      # block on every chip.
      peak = total / GIB + unread + sm["running_total_gib"] + sm["held_output_gib"]
      gather = model_c + sm["running_total_gib"] + sm["held_output_gib"]
      gather += sm["gather_chip_gib"]
      sm.update(
        model_chip_gib=model_c,
        unread_inputs_gib=unread,
        state_out_gib=chip_out - sm["stats_chip_gib"],
        batches=n_batches,
        peak_gib=peak,
        gather_peak_gib=gather,
        fits=(max(peak, gather) * GIB <= hbm) if hbm else None,
      )
      rec.update(sm)
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    if ca and "flops" in ca:
      rec["xla_flops_per_chip"] = float(ca["flops"])  # a scanned body counts once: a lower bound
  peak = target.chip.peak_flops
  if peak:
    step_s = fl["total"] / (chips * peak * mfu)
    rec.update(peak_tflops=peak / 1e12, step_s=step_s, tokens_per_s=tokens / step_s)
  return rec


def _size(gib: float) -> str:
  return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.2f} MiB"


def describe(r: dict[str, Any]) -> str:
  """The human-readable report of one stage."""
  mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items())
  fit = "n/a (no HBM size)" if r["fits"] is None else ("FITS" if r["fits"] else "DOES NOT FIT")
  hbm = f" of {r['hbm_gib']:.1f} GiB HBM" if r["hbm_gib"] else ""
  head = (
    f"[{r['stage']}] {r['topology']}: {r['chips']} x {r['chip']}, {r['hosts']} host(s), "
    f"mesh {mesh}; batch {r['batch']} x {r['seq_len']} ({r['per_host_batch']} rows per "
    f"host)"
  )
  if r["total_gib"] is None:
    return (
      f"{head}\n  DOES NOT FIT: the compiler needs {r['temp_gib']:.2f} GiB of temporaries "
      f"per chip, {r['available_gib']:.2f} GiB are available ({r['oom']})"
    )
  lines = [
    f"{head}; compiled in {r['compile_s']:.1f}s",
    (
      f"  per-chip memory: arguments {_size(r['argument_gib'])}, outputs "
      f"{_size(r['output_gib'])} (aliased {_size(r['alias_gib'])}), temporaries "
      f"{_size(r['temp_gib'])}, code {_size(r['code_gib'])}; total {_size(r['total_gib'])}"
      f"{hbm}: {fit}"
    ),
    f"  model FLOPs per step {r['flops']:.4g} (analytic; forward {r['flops_forward']:.4g})",
  ]
  if "step_s" in r:
    lines.append(
      f"  estimated step {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s "
      f"at MFU {r['mfu']:.0%} of {r['peak_tflops']:.0f} TFLOP/s bf16 per chip"
    )
  if "stats_gib" in r:
    lines.extend(describe_stats(r))
  return "\n".join(lines)


def describe_stats(r: dict[str, Any]) -> list[str]:
  """The statistics pass's lines: sharding of its outputs, the copies around it, the host."""
  split = ", ".join(
    f"{k} {'x'.join(map(str, r['stats_shapes'][k]))} {r['stats_shardings'][k]}"
    + (f" ({r['stats_split'][k]}-way)" if r["stats_split"][k] > 1 else " (replicated)")
    for k in r["stats_shapes"]
  )
  sharded = {True: "split over every chip", False: "NOT split over every chip", None: "-"}
  hbm = f" of {r['hbm_gib']:.1f} GiB" if r["hbm_gib"] else ""
  fit = "n/a" if r["fits"] is None else ("FITS" if r["fits"] else "DOES NOT FIT")
  lines = [
    f"  statistics {r['stats_gib']:.3f} GiB global ({sharded[r['stats_sharded']]}), "
    f"{_size(r['stats_chip_gib'])} per chip: {split}",
    f"  outputs beside the statistics (model state nnx.jit returns): "
    f"{_size(r['state_out_gib'])} per chip",
  ]
  if r["unread_inputs_gib"]:
    lines.append(
      f"  model variables and batch fields the pass does not read (on the chips, not in "
      f"its arguments): "
      f"{_size(r['unread_inputs_gib'])} per chip"
    )
  if r["running_total_gib"]:
    lines.append(
      f"  over {r['batches']} batches: + running total {_size(r['running_total_gib'])} (each "
      f"output is added into it and dropped; held beside the pass: "
      f"{_size(r['held_output_gib'])}) = {_size(r['peak_gib'])} per chip while a pass runs"
    )
  lines.append(
    f"  gather: {_size(r['gather_peak_gib'])} per chip"
    + (
      f" (host_array replicates {r['gathered']}, {_size(r['gather_chip_gib'])}, on every chip)"
      if r["gather_chip_gib"]
      else " (one host: fetched from the shards)"
    )
    + f"; peak {_size(max(r['peak_gib'], r['gather_peak_gib']))}{hbm}: {fit}"
  )
  if r["host_float64_gb"]:
    host = (
      f"  host, on every host: {r['host_fetch_gb']:.2f} GB float32 fetched + "
      f"{r['host_float64_gb']:.2f} GB float64 kept (peak {r['host_peak_gb']:.2f} GB)"
    )
  else:
    host = (
      f"  host, on every host: {r['host_fetch_gb']:.3f} GB float32 per batch, "
      f"{r['batches']} batches kept and concatenated (peak {r['host_peak_gb']:.3f} GB)"
    )
  lines.append(host)
  return lines


STATS_TABLE_HEAD = (
  "| config | pass | topology (chips) | mesh d x f x t | per-host batch | statistics GB | "
  "split over every chip (per chip) | per-chip GiB: pass (args + temps + outputs) | "
  "+ unread inputs + running total + held output | gathering | host GB per host | fits |\n"
  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _gb(x: float) -> str:
  return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def stats_markdown_row(r: dict[str, Any], config: str) -> str:
  """One row of docs/scaling.md's statistics-pass table."""
  fits = "n/a" if r["fits"] is None else ("yes" if r["fits"] else "**no**")
  mesh = "x".join(str(v) for v in r["mesh"].values())
  head = (
    f"| {config} | {r['stage']} | {r['topology']} ({r['chips']}) | {mesh} | "
    f"{r['per_host_batch']} x {r['seq_len']} |"
  )
  if r["total_gib"] is None:
    return (
      f"{head} - | - | > {r['available_gib']:.2f} (temporaries alone {r['temp_gib']:.2f}) "
      f"| - | - | - | {fits} |"
    )
  sharded = {True: "yes", False: "**no**", None: "-"}[r["stats_sharded"]]
  host = (
    f"{r['host_fetch_gb']:.1f} f32 + {r['host_float64_gb']:.1f} f64 (peak {r['host_peak_gb']:.1f})"
    if r["host_float64_gb"]
    else f"{_gb(r['host_peak_gb'])} f32"
  )
  return (
    f"{head} {_gb(r['stats_gib'] * GIB / GB)} | {sharded} ({_size(r['stats_chip_gib'])}) | "
    f"{r['total_gib']:.2f} ({r['argument_gib']:.2f} + {r['temp_gib']:.2f} + "
    f"{r['output_gib']:.2f}) | {r['peak_gib']:.2f} | {r['gather_peak_gib']:.2f} | {host} | "
    f"{fits} |"
  )


def markdown_row(r: dict[str, Any], config: str) -> str:
  """One row of the docs/scaling.md table."""
  fits = "n/a" if r["fits"] is None else ("yes" if r["fits"] else "**no**")
  mesh = "x".join(str(v) for v in r["mesh"].values())
  step = f"{r['step_s']:.2f}" if "step_s" in r and r["fits"] is not False else "-"
  tps = f"{r['tokens_per_s']:,.0f}" if "step_s" in r and r["fits"] is not False else "-"
  if r["total_gib"] is None:
    mem = f"> {r['available_gib']:.2f} (temporaries alone {r['temp_gib']:.2f})"
  else:
    mem = f"{r['total_gib']:.2f} ({r['argument_gib']:.2f} + {r['temp_gib']:.2f})"
  return (
    f"| {config} | {r['stage']} | {r['topology']} | {mesh} | {r['per_host_batch']} x "
    f"{r['seq_len']} | {fits} | {mem} | {step} | {tps} |"
  )


# ------------------------------------------------------------ command line
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file (configs/*.py); override fields with --config.SECTION.FIELD=V "
  "(e.g. --config.mesh.data=1 --config.mesh.fsdp=-1 --config.data.batch_size=32).",
  lock_config=True,
)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "cpu:N (local CPU devices) or a TPU slice as libtpu names it: v4:2x2x2, "
  "v5e:4x4, v5e:8x8, v5p:2x2x2, v6e:4x4 ...",
)
_STAGE = flags.DEFINE_string(
  "stage",
  "forecaster,router,lora,infer",
  f"comma-separated steps to compile, from {list(ALL_STAGES)} (infer: the routed hard top-k "
  "eval step; infer_dense: the dense one; *_stats, error_curves: the closed-form fits' "
  "statistics passes)",
)
_MFU = flags.DEFINE_float("mfu", 0.4, "assumed model FLOPs utilisation for the step time")
_HOST = flags.DEFINE_string(
  "chips_per_host", "2,2,1", "chip grid of one host (TPU VMs of v4, v5e and v5p slices: 2x2x1)"
)
_HBM = flags.DEFINE_float("hbm_gib", None, "override the chip's HBM (GiB)")
_PEAK = flags.DEFINE_float("peak_tflops", None, "override the chip's peak bf16 TFLOP/s")
_JSON = flags.DEFINE_string("json", None, "append one JSON line per stage to this file")
_MD = flags.DEFINE_bool("markdown", False, "also print one docs/scaling.md table row per stage")
flags.mark_flags_as_required(["config", "topology"])


def run(
  cfg: Any,
  topology: str,
  stages: list[str],
  *,
  mfu: float = 0.4,
  chips_per_host: tuple[int, int, int] = (2, 2, 1),
  hbm_gib: float | None = None,
  peak_tflops: float | None = None,
) -> list[dict[str, Any]]:
  """Checks every stage in `stages` of config `cfg` on `topology`; one record per stage."""
  bad = [x for x in stages if x not in ALL_STAGES]
  if not stages or bad:
    raise ConfigError(f"--stage must list steps from {list(ALL_STAGES)}, got {stages}")
  if not 0 < mfu <= 1:
    raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
  s = settings_from_config(cfg)
  target = target_devices(topology, chips_per_host, hbm_gib, peak_tflops)
  return [check_stage(s, stage, target, mfu) for stage in stages]


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    grid = tuple(int(x) for x in _HOST.value.split(","))
    assert len(grid) == 3
  except (ValueError, AssertionError):
    raise ConfigError(
      f"--chips_per_host must be three integers like 2,2,1, got {_HOST.value!r}"
    ) from None
  stages = [x.strip() for x in _STAGE.value.split(",") if x.strip()]
  cfg = _CONFIG.value
  try:
    cfg.keys()
  except OSError as e:
    raise ConfigError(f"cannot load --config: {str(e).strip().splitlines()[-1]}") from None
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  rel = os.path.relpath(config_file)
  config_file = config_file if rel.startswith("..") else rel
  fits = True
  for stage in stages:  # one at a time, so each result prints as soon as it is known
    (r,) = run(
      cfg,
      _TOPOLOGY.value,
      [stage],
      mfu=_MFU.value,
      chips_per_host=grid,
      hbm_gib=_HBM.value,
      peak_tflops=_PEAK.value,
    )
    print(describe(r), flush=True)
    if _MD.value:
      row = stats_markdown_row if r["stage"] in STATS_STAGES else markdown_row
      print(row(r, config_file), flush=True)
    if _JSON.value:
      with open(_JSON.value, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(r, config=config_file)) + "\n")
    fits = fits and r["fits"] is not False
  return 0 if fits else EXIT_DOES_NOT_FIT


def _entry(argv: list[str]) -> None:
  from ir_jax.errors import cli_main

  cli_main(lambda: main(argv), PROG)


if __name__ == "__main__":
  from ir_jax import absl_cli

  app.run(_entry, flags_parser=lambda argv: absl_cli.parse_flags(argv, PROG, __doc__))
