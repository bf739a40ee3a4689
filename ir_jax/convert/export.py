"""Export a trained ir_jax model: a HuggingFace Llama directory plus its routing modules.

`export(src, out, fmt)` reads an ir_jax checkpoint directory or an
`ir_jax.train` workdir and writes

  config.json, generation_config.json       transformers' LlamaForCausalLM config
  model.safetensors                         base weights with LoRA merged (or sharded
    | model-0000k-of-0000n.safetensors      shards + model.safetensors.index.json
      + model.safetensors.index.json        above `max_shard_size`)
  tokenizer.json, tokenizer_config.json     when the checkpoint has them
  routing.safetensors                       forecasters, routers (and thresholds) in
                                            the ir_jax or the reference layout
  routing.json                              how to rebuild the routed model

Tensors are made and written one at a time (a layer's slice, LoRA merged,
transposed to HF layout), so the export holds the restored model once plus
one tensor. Everything is written under a temporary sibling name that is
renamed to `out` only at the end: an interrupted or disk-full export leaves
no directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np

from ir_jax import checkpoint
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.convert import mapping, routing_io
from ir_jax.convert.safetensors_io import tensor_nbytes, write_streaming
from ir_jax.rundir import is_run, read_run, stage_dir

FORMATS = ("hf", "reference")
DEFAULT_SHARD_SIZE = "5GB"
INDEX_FILE = "model.safetensors.index.json"
ORBAX_TMP = ".orbax-checkpoint-tmp"
ORBAX_COMMIT = "commit_success.txt"
# Our kernel -> its LoRA adapter (`scale * (n @ a) @ b` is added to `n @ kernel`).
LORA = {
  ("layers", "self_attn", "q_proj"): ("layers", "self_attn", "q_lora"),
  ("layers", "self_attn", "v_proj"): ("layers", "self_attn", "v_lora"),
  ("layers", "mlp", "gate_proj"): ("layers", "mlp", "gate_lora"),
}


class ExportError(checkpoint.CheckpointError):
  """The checkpoint cannot be exported as asked (still being written, disk full, bad --out)."""


@dataclasses.dataclass
class Trained:
  """A trained model as export reads it."""

  config: LlamaConfig
  params: dict  # pure dict; jax, numpy or Lazy (still on disk) leaves
  spec: Any  # RoutingSpec the routers were trained for, or None
  tokenizer_dir: str | None
  source: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Lazy:
  """A parameter still on disk: one leaf of an orbax checkpoint, restored on demand."""

  directory: str  # the orbax item directory (e.g. CKPT/params)
  path: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype

  def load(self) -> np.ndarray:
    """This leaf alone (orbax partial restore), as numpy in `dtype`."""
    import orbax.checkpoint as ocp

    item: Any = 0
    args: Any = ocp.RestoreArgs(restore_type=np.ndarray, dtype=self.dtype)
    for k in reversed(self.path):
      item, args = {k: item}, {k: args}
    try:
      tree = ocp.PyTreeCheckpointer().restore(
        self.directory,
        args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
      )
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise checkpoint.CheckpointError(
        f"{self.directory}: cannot restore {'/'.join(self.path)} ({str(e)[:300]})"
      ) from None
    value = _get(tree, self.path)
    if tuple(value.shape) != tuple(self.shape):
      raise checkpoint.CheckpointError(
        f"{self.directory}: {'/'.join(self.path)} is shaped {list(value.shape)}, the config "
        f"expects {list(self.shape)}"
      )
    return value


def _lazy_tree(
  directory: str, abstract: dict, dtype: Any = None, prefix: tuple[str, ...] = ()
) -> dict:
  """`abstract` (a pure dict of ShapeDtypeStructs) as Lazy leaves of the checkpoint at
  `directory`; floating leaves in `dtype` when given."""
  out = {}
  for k, v in abstract.items():
    if isinstance(v, dict):
      out[k] = _lazy_tree(directory, v, dtype, prefix + (k,))
    else:
      dt = np.dtype(v.dtype)
      if dtype is not None and jax.numpy.issubdtype(dt, jax.numpy.floating):
        dt = np.dtype(dtype)
      out[k] = Lazy(directory, prefix + (k,), tuple(v.shape), dt)
  return out


class Leaves:
  """Parameter leaves by path, loading Lazy ones when first used.

  Big leaves (base weights) are kept one at a time: the previous one is dropped
  before the next is restored, so export holds one stacked parameter, not the
  model. Small ones (LoRA adapters, routing modules) are kept.
  """

  def __init__(self, params: dict):
    self.params = params
    self._big: tuple[tuple[str, ...] | None, Any] = (None, None)
    self._small: dict[tuple[str, ...], Any] = {}

  def get(self, path: tuple[str, ...]) -> Any:
    leaf = _get(self.params, path)
    if not isinstance(leaf, Lazy):
      return leaf
    small = path[0] == "routing" or path[:3] in LORA.values()
    if small:
      if path not in self._small:
        self._small[path] = leaf.load()
      return self._small[path]
    if self._big[0] != path:
      self._big = (None, None)
      self._big = (path, leaf.load())
    return self._big[1]

  def tree(self, prefix: tuple[str, ...]) -> dict:
    """The subtree at `prefix`, loaded (for the small routing subtree)."""

    def walk(node: Any, path: tuple[str, ...]) -> Any:
      if isinstance(node, dict):
        return {k: walk(v, path + (k,)) for k, v in node.items()}
      return self.get(path)

    return walk(_get(self.params, prefix), prefix)


# ------------------------------------------------------------ reading the source
def _orbax_pending(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if ORBAX_TMP in n)


def _check_committed(item_dir: str, what: str) -> None:
  """Refuses an orbax directory that is still being written or never finished."""
  parent, name = os.path.split(item_dir.rstrip(os.sep))
  pending = [n for n in _orbax_pending(parent) if n.startswith(name + ".")]
  if pending:
    raise ExportError(
      f"{os.path.join(parent, pending[0])}: {what} is still being written "
      "(orbax temporary directory); wait for the writer to finish, or remove "
      "it if no process is writing"
    )
  if not os.path.isdir(item_dir):
    raise ExportError(f"{item_dir}: missing; the {what} is incomplete")
  if not os.path.isfile(os.path.join(item_dir, ORBAX_COMMIT)):
    raise ExportError(
      f"{item_dir}: no {ORBAX_COMMIT}; orbax has not finished writing the "
      f"{what} (still being written, or the write was interrupted)"
    )


def _check_checkpoint(path: str) -> None:
  if ".partial-" in os.path.basename(os.path.abspath(path)):
    raise ExportError(f"{path}: a temporary directory of an unfinished write, not a checkpoint")
  _check_committed(os.path.join(path, checkpoint.PARAMS_DIR), "checkpoint")


def _newest_step(workdir: str, stages: list[str]) -> tuple[str, int]:
  """The (stage, step) whose adapters `run_result` loads, after checking it is complete."""
  for stage in stages:
    pending = _orbax_pending(stage_dir(workdir, stage))
    if pending:
      raise ExportError(
        f"{os.path.join(stage_dir(workdir, stage), pending[0])}: a training checkpoint is "
        "still being written; wait for it (or the run) to finish, or remove it if no "
        "process is writing"
      )
  for stage in reversed(stages):
    d = stage_dir(workdir, stage)
    steps = sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []
    if steps:
      _check_committed(os.path.join(d, str(steps[-1])), f"{stage} checkpoint")
      return stage, steps[-1]
  raise ExportError(f"{workdir}: the run has no finished checkpoint yet; nothing to export")


def _host() -> jax.Device:
  """Export restores into host memory (the CPU backend), whatever accelerators exist."""
  return jax.devices("cpu")[0]


def _on_host(abstract: Any) -> Any:
  """Restore targets on the host device."""
  host = jax.sharding.SingleDeviceSharding(_host())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), abstract)


def _restore_run(workdir: str, cfg: LlamaConfig, base_path: str, stage: str, step: int) -> dict:
  """What `ir_jax.train.rundir.run_result` gives (base weights + the newest adapters),
  restored straight into host memory without initialising a model."""
  import orbax.checkpoint as ocp
  from flax import nnx

  from ir_jax.model import abstract_model
  from ir_jax.train import checkpoints, steps

  _, abs_state = nnx.split(abstract_model(cfg))
  abs_adapters, abs_base = nnx.split_state(abs_state, steps.ADAPTERS, ...)
  mgr = ocp.CheckpointManager(
    stage_dir(workdir, stage),
    options=ocp.CheckpointManagerOptions(create=False),
    item_handlers={"adapters": ocp.StandardCheckpointHandler()},
  )
  try:
    adapters = nnx.to_pure_dict(checkpoints.restore_adapters(mgr, step, _on_host(abs_adapters)))
  finally:
    mgr.close()
  # Base weights stay on disk until written, in the run's parameter dtype (as
  # the run itself restores them); Lazy.load checks each one's shape.
  params = _lazy_tree(
    os.path.join(base_path, checkpoint.PARAMS_DIR), nnx.to_pure_dict(abs_base), cfg.weight_dtype
  )
  _deep_update(params, adapters)
  return params


def _deep_update(tree: dict, other: dict) -> None:
  for k, v in other.items():
    if isinstance(v, dict) and isinstance(tree.get(k), dict):
      _deep_update(tree[k], v)
    else:
      tree[k] = v


def open_trained(path: str) -> Trained:
  """Restores an ir_jax checkpoint directory or training workdir for export (into host
  memory, on one CPU device)."""
  from ir_jax import convert

  path = os.path.abspath(os.fspath(path))
  if is_run(path):
    meta = read_run(path)
    stage, step = _newest_step(path, list(meta["stages"]))
    base = meta.get("base") or {}
    cfg = LlamaConfig.from_dict(meta["model"])
    if base.get("kind") == "checkpoint":
      _check_checkpoint(base["path"])
      params = _restore_run(path, cfg, base["path"], stage, step)
      tok_dir = base["path"]
    else:  # random base weights: only the run's own initialisation can remake them
      from flax import nnx

      from ir_jax import sharding
      from ir_jax.train.rundir import run_result

      model_state = run_result(path, sharding.make_mesh(sharding.MeshConfig(data=1), [_host()]))
      params, tok_dir = nnx.to_pure_dict(model_state.state), None
    return Trained(
      cfg,
      params,
      routing_io.load_spec(path),
      tok_dir,
      {"workdir": path, "stage": stage, "step": step},
    )
  if checkpoint.is_checkpoint(path):
    _check_checkpoint(path)
    cfg = checkpoint.load_config(path)
    params = _lazy_tree(os.path.join(path, checkpoint.PARAMS_DIR), convert.abstract_params(cfg))
    return Trained(cfg, params, routing_io.load_spec(path), path, {"checkpoint": path})
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  raise checkpoint.CheckpointError(
    f"{path}: neither an ir_jax checkpoint ({checkpoint.META_FILE}) nor an ir_jax.train "
    "workdir (run.json); import HF or GGUF weights with `python -m ir_jax.convert import`"
  )


# ------------------------------------------------------------ LoRA merge
def exported_config(cfg: LlamaConfig) -> LlamaConfig:
  """The config of the exported (LoRA-merged) model."""
  alpha = LlamaConfig.__dataclass_fields__["lora_alpha"].default
  return cfg.replace(lora_rank=0, lora_alpha=alpha)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def merged_slice(
  cfg: LlamaConfig, leaves: Leaves, path: tuple[str, ...], layer: int | None
) -> np.ndarray:
  """One parameter (one layer's slice of a stacked one) in our layout, LoRA merged.

  W' = W + scale * A @ B in float32, cast back to W's dtype: `n @ W'` is
  the adapted projection `n @ W + scale * (n @ A) @ B`.
  """
  leaf = leaves.get(path)
  w = np.asarray(leaf if layer is None else leaf[layer])
  if cfg.lora_rank and path in LORA:
    a = np.asarray(leaves.get(LORA[path] + ("a",))[layer], np.float32)
    b = np.asarray(leaves.get(LORA[path] + ("b",))[layer], np.float32)
    delta = np.tensordot(a, b, axes=1)  # [D, out...], like the kernel
    w = (w.astype(np.float32) + np.float32(cfg.lora_scale) * delta).astype(w.dtype)
  return w


def merge_lora(cfg: LlamaConfig, params: dict) -> tuple[LlamaConfig, dict]:
  """The whole parameter tree with LoRA merged (numpy), and its config. For small models:
  export itself merges one layer at a time."""
  out_cfg = exported_config(cfg)
  leaves = Leaves(params)
  out: dict = {}

  def put(path: tuple[str, ...], value: np.ndarray) -> None:
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value

  def walk(tree: dict, prefix: tuple[str, ...]) -> None:
    for k, v in tree.items():
      path = prefix + (k,)
      if isinstance(v, dict):
        if path not in LORA.values():
          walk(v, path)
      elif path in LORA and cfg.lora_rank:
        put(path, np.stack([merged_slice(cfg, leaves, path, i) for i in range(cfg.num_layers)]))
      else:
        put(path, np.asarray(leaves.get(path)))

  walk(params, ())
  return out_cfg, out


def merged_model(path: str) -> tuple[Any, Any]:
  """(model, spec): the model an export of `path` rebuilds, on one device (LoRA merged)."""
  from ir_jax import convert

  t = open_trained(path)
  cfg, params = merge_lora(t.config, t.params)
  return convert.model_from_params(cfg, params), t.spec


# ------------------------------------------------------------ writing
def parse_size(text: str | int) -> int:
  """'5GB' -> 5 * 10**9, '20KiB' -> 20 * 1024, plain integers are bytes."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
  if not m:
    raise ConfigError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 20KiB")
  unit = m.group(2).upper().rstrip("B")
  power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
  base = 1024 if unit.endswith("I") else 1000
  size = int(float(m.group(1)) * base**power)
  if size < 1:
    raise ConfigError(f"--max-shard-size {text!r} must be at least 1 byte")
  return size


TensorSpec = tuple[str, np.dtype, tuple[int, ...]]


def hf_tensors(
  cfg: LlamaConfig, leaves: Leaves
) -> tuple[list[TensorSpec], Callable[[str], np.ndarray]]:
  """Every HF tensor's (key, dtype, shape) in file order, and a function making one.

  The order is parameter-major (layer 0..L-1 of q_proj, then of k_proj, ...), so
  each stacked parameter is restored once and dropped before the next.
  """
  specs: list[TensorSpec] = []
  makers: dict[str, Callable[[], np.ndarray]] = {}
  entries = list(mapping.entries(cfg.tie_word_embeddings))
  order = (
    [e for e in entries if e.path == ("embed_tokens",)]
    + [e for e in entries if e.per_layer]
    + [e for e in entries if not e.per_layer and e.path != ("embed_tokens",)]
  )
  for e in order:
    leaf = _get(leaves.params, e.path)
    for layer in range(cfg.num_layers) if e.per_layer else [None]:
      ours = tuple(leaf.shape[1:]) if layer is not None else tuple(leaf.shape)
      key = e.hf.format(i=layer)
      specs.append((key, np.dtype(leaf.dtype), mapping.hf_shape(e, ours)))
      makers[key] = lambda e=e, layer=layer: mapping.to_hf(
        e, merged_slice(cfg, leaves, e.path, layer)
      )
  return specs, lambda key: makers[key]()


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
  """Greedy, in order: a shard closes before the tensor that would pass `max_bytes`
  (a single larger tensor gets a shard of its own)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for s in specs:
    n = tensor_nbytes(s[1], s[2])
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += n
  return shards


def write_hf_weights(
  out_dir: str,
  cfg: LlamaConfig,
  leaves: Leaves,
  max_bytes: int,
  log: Callable[[str], None] = lambda _: None,
  progress: Callable[[int, int], None] | None = None,
) -> list[str]:
  """Writes model.safetensors (or shards + index) tensor by tensor; returns the files.

  `progress(tensors_made, tensors)` is called as each tensor is built."""
  specs, build = hf_tensors(cfg, leaves)
  made = [0]

  def make(key: str) -> np.ndarray:
    value = build(key)
    made[0] += 1
    if progress is not None:
      progress(made[0], len(specs))
    return value

  shards = plan_shards(specs, max_bytes)
  meta = {"format": "pt"}
  if len(shards) == 1:
    write_streaming(os.path.join(out_dir, "model.safetensors"), specs, make, meta)
    return ["model.safetensors"]
  names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    total += write_streaming(os.path.join(out_dir, name), shard, make, meta)
    weight_map.update({s[0]: name for s in shard})
    log(f"  wrote {name} ({len(shard)} tensors)")
  with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names + [INDEX_FILE]


def _check_out(src: str, out: str, overwrite: bool) -> None:
  src, out = os.path.abspath(src), os.path.abspath(out)
  if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
    raise ExportError(
      f"--out {out} overlaps the checkpoint being exported ({src}); choose another --out"
    )
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"{out}: exists and is not a directory; choose another --out")
  if os.path.exists(out) and not overwrite and os.listdir(out):
    raise FileExistsError(
      f"{out}: already exists and is not empty; choose another --out or pass --overwrite"
    )


def export(
  src: str,
  out: str,
  fmt: str = "hf",
  *,
  overwrite: bool = False,
  max_shard_size: str | int = DEFAULT_SHARD_SIZE,
  log: Callable[[str], None] = lambda _: None,
  progress: Callable[[int, int], None] | None = None,
) -> str:
  """Exports an ir_jax checkpoint directory or training workdir; returns `out` (absolute).
  `progress(tensors_written, tensors)` follows the model weights.

  fmt "hf": routing.safetensors in the ir_jax layout; "reference": in the
  layout of the public PyTorch code (same HF weights beside it).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
  max_bytes = parse_size(max_shard_size)
  _check_out(src, out, overwrite)
  trained = open_trained(src)  # checks the source is complete before restoring it
  cfg = trained.config
  out_cfg = exported_config(cfg)
  lora = (
    {
      "merged": True,
      "rank": cfg.lora_rank,
      "alpha": cfg.lora_alpha,
      "targets": ["q_proj", "v_proj", "gate_proj"],
    }
    if cfg.lora_rank
    else {"merged": False}
  )
  out = os.path.abspath(out)
  current = "the output directory"
  try:
    with checkpoint.atomic_dir(out, overwrite) as tmp:
      current = "model weights"
      leaves = Leaves(trained.params)
      files = write_hf_weights(tmp, cfg, leaves, max_bytes, log, progress)
      log(f"  wrote {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")
      current = "config files"
      with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(out_cfg.to_hf(), f, indent=2)
      gen = {"_from_model_config": True}
      gen.update(
        {
          k: getattr(cfg, k)
          for k in ("bos_token_id", "eos_token_id", "pad_token_id")
          if getattr(cfg, k) is not None
        }
      )
      with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
      for name in checkpoint.TOKENIZER_FILES:
        if trained.tokenizer_dir and os.path.isfile(os.path.join(trained.tokenizer_dir, name)):
          shutil.copyfile(os.path.join(trained.tokenizer_dir, name), os.path.join(tmp, name))
      current = "routing modules"
      layout = "ir_jax" if fmt == "hf" else "reference"
      routing_io.write(
        tmp,
        out_cfg,
        leaves.tree(("routing",)),
        layout,
        spec=trained.spec,
        lora=lora,
        source=trained.source,
      )
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise ExportError(
        f"{out}: disk full while writing the {current} ({e.strerror}); nothing "
        "was written under that name"
      ) from None
    raise
  return out
