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

import errno
import json
import os
import re
import shutil
from typing import Any, Callable

import numpy as np

from ir_jax import checkpoint
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.convert import mapping, model_from_params, routing_io
from ir_jax.convert.safetensors_io import tensor_nbytes, write_streaming
from ir_jax.convert.trained import (  # noqa: F401  (Lazy, Trained: also importable from here)
  LORA,
  ExportError,
  Lazy,
  Leaves,
  Trained,
  _get,
  open_trained,
)

FORMATS = ("hf", "reference")
DEFAULT_SHARD_SIZE = "5GB"
INDEX_FILE = "model.safetensors.index.json"


# ------------------------------------------------------------ LoRA merge
def exported_config(cfg: LlamaConfig) -> LlamaConfig:
  """The config of the exported (LoRA-merged) model."""
  alpha = LlamaConfig.__dataclass_fields__["lora_alpha"].default
  return cfg.replace(lora_rank=0, lora_alpha=alpha)


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
  t = open_trained(path)
  cfg, params = merge_lora(t.config, t.params)
  return model_from_params(cfg, params), t.spec


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
