"""Forecasters, routers and thresholds beside a HuggingFace directory: `routing.json` + `routing.safetensors`.

`routing.json` says how to rebuild the routed model: the layout of the
tensor file (`ir_jax` or `reference`), the ir_jax model fields HF's
config.json cannot hold (forecaster rank, router width, dtypes), the routing
spec the routers were trained for, what the thresholds mean, and whether
LoRA was merged. `routing.safetensors` holds, per layer i:

  ir_jax layout (our orientation, `y = x @ W`):
    model.layers.{i}.{attn,mlp}_lff.{w1 [d, r], b1 [r], w2 [r, d], b2 [d]}
    model.layers.{i}.{attn,mlp}_router.{w1 [d, h], b1 [h], w2 [h], b2 [1]}  (w1, b1 absent when h = 0)
    model.layers.{i}.threshold [2] (float32; attn, mlp)
    model.layers.{i}.capacity [2] (float32; the trained capacity table row, -1: none)
    model.layers.{i}.calibrated_for [2] (float32; capacities the thresholds were calibrated
                                          for, -1: never)
  reference layout: see `ir_jax.convert.reference` (the thresholds are folded into the
  routers' second logit bias and also listed in routing.json, with the capacity table
  and calibration record).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator

import numpy as np

from ir_jax import checkpoint
from ir_jax.config import ConfigError, LlamaConfig, read_json_object
from ir_jax.config_sections import routing_spec
from ir_jax.convert import reference
from ir_jax.convert.errors import WeightImportError
from ir_jax.convert.safetensors_io import SafetensorsFile, write_streaming
from ir_jax.forecast import UNITS
from ir_jax.routing.capacity import CapacityTable, backfill
from ir_jax.routing.spec import RoutingSpec

MANIFEST = "routing.json"
WEIGHTS = "routing.safetensors"
FORMAT = "ir_jax.routing"
VERSION = 1
LAYOUTS = ("ir_jax", "reference")
# LlamaConfig fields that config.json cannot carry but the routed model needs.
MODEL_FIELDS = ("lff_rank", "router_hidden", "dtype", "param_dtype", "scan_layers", "remat")
SPEC_FIELDS = ("policy", "sparsity", "capacities", "k_multiple", "seed")
PREFIX = "model.layers.{i}."
THRESHOLD_MEANING = (
  "causal mode (decoding): token t executes unit u of layer l iff its router score > "
  "values[l][u], else the unit is approximated by its forecaster; calibrated on held-out "
  "tokens so each unit executes its capacity. '-inf' always executes, 'inf' never. "
  "Top-k mode ignores thresholds."
)
CAPACITY_MEANING = (
  "the trained per-unit capacity table: values[l][u] is the fraction of tokens unit u of "
  "layer l executes in top-k mode (the rest are approximated by the forecaster); its mean "
  "sparsity is the spec's. null: no table (uniform capacity 1 - sparsity)."
)


# ------------------------------------------------------------ routing spec
def spec_to_json(spec: Any) -> dict[str, Any] | None:
  """The training-relevant fields of a RoutingSpec as JSON data (None stays None)."""
  if spec is None:
    return None
  d = {f: getattr(spec, f) for f in SPEC_FIELDS}
  if d["capacities"] is not None:
    d["capacities"] = [list(r) for r in d["capacities"]]
  return d


def spec_from_json(d: Any, where: str) -> Any:
  if d is None:
    return None
  if not isinstance(d, dict) or set(d) - set(SPEC_FIELDS):
    raise WeightImportError(
      f"{where}: routing spec must be an object with fields from "
      f"{list(SPEC_FIELDS)}, got {str(d)[:200]}"
    )
  d = dict(d)
  if d.get("capacities") is not None:
    d["capacities"] = tuple(tuple(r) for r in d["capacities"])
  try:
    return RoutingSpec(**d)
  except (ConfigError, TypeError) as e:
    raise WeightImportError(f"{where}: bad routing spec ({e})") from None


def _float_json(x: float) -> float | str:
  x = float(x)
  return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _float_from_json(v: Any, where: str) -> float:
  if isinstance(v, str) and v in ("inf", "-inf", "nan"):
    return float(v)
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return float(v)
  raise WeightImportError(f"{where}: threshold {v!r} is not a number")


# ------------------------------------------------------------ tensor tables
def _flat(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for k in sorted(tree):
    v = tree[k]
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def tensor_specs(
  cfg: LlamaConfig, routing: dict, layout: str
) -> tuple[list[tuple[str, np.dtype, tuple[int, ...]]], Callable[[str], np.ndarray]]:
  """(name, dtype, shape) of every routing tensor in `layout`, and a function making one.

  `routing` is the model's `routing` subtree (leaves `[L, ...]`, numpy or jax).
  """
  leaves = dict(_flat(routing))
  layers = cfg.num_layers
  specs: list[tuple[str, np.dtype, tuple[int, ...]]] = []
  makers: dict[str, Callable[[], np.ndarray]] = {}

  def slice_of(path: tuple[str, ...], i: int) -> np.ndarray:
    return np.asarray(leaves[path][i])

  for i in range(layers):
    pre = PREFIX.format(i=i)
    if layout == "ir_jax":
      for path, leaf in leaves.items():
        name = pre + ".".join(path)
        specs.append((name, np.dtype(leaf.dtype), tuple(leaf.shape[1:])))
        makers[name] = lambda path=path, i=i: slice_of(path, i)
    else:
      dtype = np.dtype(leaves[("attn_lff", "w1")].dtype)
      get = lambda module, param, i=i: slice_of((module, param), i)
      thr = slice_of(("threshold",), i)
      for key, shape in reference.layout(cfg.hidden_size, cfg.lff_rank, cfg.router_hidden).items():
        specs.append((pre + key, dtype, shape))
        makers[pre + key] = lambda key=key, get=get, thr=thr: reference.to_reference(
          get, cfg.router_hidden, key, thr
        )
  return specs, lambda name: makers[name]()


def write(
  out_dir: str,
  cfg: LlamaConfig,
  routing: dict,
  layout: str,
  *,
  spec: Any,
  lora: dict[str, Any],
  source: dict[str, Any],
) -> None:
  """Writes routing.safetensors, then routing.json, into `out_dir`."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown routing layout {layout!r}; expected one of {LAYOUTS}")
  specs, make = tensor_specs(cfg, routing, layout)
  write_streaming(
    os.path.join(out_dir, WEIGHTS), specs, make, {"format": "pt", "ir_jax_layout": layout}
  )
  thr = np.asarray(routing["threshold"], np.float32)
  cal = np.asarray(routing["calibrated_for"], np.float32) if "calibrated_for" in routing else None
  calibrated = cal is not None and bool((cal >= 0).all())
  thresholds: dict[str, Any] = {
    "meaning": THRESHOLD_MEANING,
    "calibrated": calibrated,
    "calibrated_for": [[float(v) for v in row] for row in cal] if calibrated else None,
  }
  if layout == "reference":  # exact values here; the router bias carries them too
    thresholds["values"] = [[_float_json(v) for v in row] for row in thr]
    thresholds["in_router_bias"] = "weight_predictor.bias[1] (+-1e30 for +-inf)"
  else:
    thresholds["tensors"] = PREFIX + "threshold"
  router = {
    "hidden": cfg.router_hidden,
    "input": "the unit's RMS-normed input (input_layernorm / post_attention_layernorm output)",
    "formula": (
      "score = w2 . relu(W1 n + b1) + b2" if cfg.router_hidden else "score = w2 . n + b2 (linear)"
    ),
    "execute": "higher score = execute: top capacity*T scores per row (topk mode) or "
    "score > threshold (causal mode)",
  }
  if layout == "reference":
    router["reference_logits"] = (
      "[score, threshold]: index 0 = execute the unit, index 1 = approximate it with the "
      "forecaster (as the reference's gumbel gates); argmax executes where ir_jax's causal "
      "mode does, softmax index 0 = sigmoid(score - threshold). Use the "
      "reference with post_norm_router=True and TokenRouter hidden width "
      f"{cfg.router_hidden or 2} (it hard-codes d // 4 - 200)"
    )
  table = CapacityTable.from_array(
    np.asarray(routing["capacity"], np.float32) if "capacity" in routing else -1.0
  )
  capacity_table = {"meaning": CAPACITY_MEANING, "values": table.to_json()}
  manifest = {
    "format": FORMAT,
    "version": VERSION,
    "layout": layout,
    "weights": WEIGHTS,
    "units": list(UNITS),
    "num_layers": cfg.num_layers,
    "hidden_size": cfg.hidden_size,
    "model": {f: getattr(cfg, f) for f in MODEL_FIELDS},
    "spec": spec_to_json(spec),
    "forecaster": {
      "rank": cfg.lff_rank,
      "input": router["input"],
      "formula": "LFF(n) = W2 silu(W1 n + b1) + b2, approximates the unit's output delta",
    },
    "router": router,
    "thresholds": thresholds,
    "capacity_table": capacity_table,
    "lora": lora,
    "source": source,
  }
  with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)


# ------------------------------------------------------------ reading
def read_manifest(path: str) -> dict[str, Any] | None:
  """routing.json of an exported directory, validated; None when there is none."""
  file = os.path.join(path, MANIFEST)
  if not os.path.isfile(file):
    return None
  m = read_json_object(file, WeightImportError)
  if m.get("format") != FORMAT:
    raise WeightImportError(f"{file}: format is not {FORMAT!r}")
  if m.get("version") != VERSION:
    raise WeightImportError(
      f"{file}: routing format version {m.get('version')!r}, this ir_jax reads {VERSION}"
    )
  if m.get("layout") not in LAYOUTS:
    raise WeightImportError(f"{file}: layout must be one of {LAYOUTS}, got {m.get('layout')!r}")
  model = m.get("model")
  if not isinstance(model, dict) or set(model) - set(MODEL_FIELDS):
    raise WeightImportError(
      f"{file}: 'model' must be an object with fields from {list(MODEL_FIELDS)}"
    )
  if not os.path.isfile(os.path.join(path, WEIGHTS)):
    raise WeightImportError(f"{path}: has {MANIFEST} but no {WEIGHTS}; the export is incomplete")
  spec_from_json(m.get("spec"), file)  # validated now, so errors name the file
  return m


def read(path: str, manifest: dict[str, Any], cfg: LlamaConfig, target: dict) -> dict:
  """The `routing` subtree (numpy, `[L, ...]` leaves) from an exported directory.

  `target` is the model's abstract routing subtree: every tensor's shape is
  checked against it and values are cast to its dtypes (a no-op for exports).
  """
  file = os.path.join(path, WEIGHTS)
  st = SafetensorsFile(file)
  leaves = dict(_flat(target))
  layers = cfg.num_layers

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in st:
      raise WeightImportError(f"{file}: tensor {name!r} is missing")
    if tuple(st.shape(name)) != tuple(shape):
      raise WeightImportError(
        f"{file}: tensor {name!r} has shape {list(st.shape(name))}, "
        f"the config expects {list(shape)}"
      )
    return st.get(name)

  slices: dict[tuple[str, ...], list[np.ndarray]] = {p: [] for p in leaves}
  ref_shapes = reference.layout(cfg.hidden_size, cfg.lff_rank, cfg.router_hidden)
  for i in range(layers):
    pre = PREFIX.format(i=i)
    if manifest["layout"] == "ir_jax":
      for p, want in leaves.items():
        if p == ("capacity",) and pre + "capacity" not in st:  # exports before tables
          slices[p].append(_capacities(manifest, file, layers)[i])
          continue
        if p == ("calibrated_for",) and pre + "calibrated_for" not in st:  # and before records
          slices[p].append(_calibrated_for(manifest, file, layers)[i])
          continue
        slices[p].append(get(pre + ".".join(p), want.shape[1:]))
      continue
    in_bias = bool((manifest.get("thresholds") or {}).get("in_router_bias"))
    mods = reference.from_reference(
      lambda k: get(pre + k, ref_shapes[k]),
      cfg.router_hidden,
      f"{file} layer {i}",
      thresholds_in_bias=in_bias,
    )
    for p in leaves:
      if p == ("threshold",):
        slices[p].append(_thresholds(manifest, file, layers)[i])
      elif p == ("capacity",):
        slices[p].append(_capacities(manifest, file, layers)[i])
      elif p == ("calibrated_for",):
        slices[p].append(_calibrated_for(manifest, file, layers)[i])
      else:
        slices[p].append(mods[p[0]][p[1]])
  out: dict = {}
  for p, want in leaves.items():
    node = out
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = np.stack(slices[p]).astype(np.dtype(want.dtype), copy=False)
  return out


def _thresholds(manifest: dict[str, Any], file: str, layers: int) -> np.ndarray:
  values = (manifest.get("thresholds") or {}).get("values")
  if values is None:
    return np.zeros((layers, len(UNITS)), np.float32)
  if (
    not isinstance(values, list)
    or len(values) != layers
    or any(not isinstance(r, list) or len(r) != len(UNITS) for r in values)
  ):
    raise WeightImportError(
      f"{file}: thresholds.values must be {layers} rows of {len(UNITS)} numbers"
    )
  return np.array([[_float_from_json(v, file) for v in r] for r in values], np.float32)


def _capacities(manifest: dict[str, Any], file: str, layers: int) -> np.ndarray:
  return _fractions(manifest, ("capacity_table", "values"), file, layers)


def _calibrated_for(manifest: dict[str, Any], file: str, layers: int) -> np.ndarray:
  # None: never calibrated, or exported before calibration records.
  return _fractions(manifest, ("thresholds", "calibrated_for"), file, layers)


def _fractions(
  manifest: dict[str, Any], where: tuple[str, str], file: str, layers: int
) -> np.ndarray:
  """A `[layers, 2]` table of fractions at manifest[where[0]][where[1]]; NO_TABLE when null."""
  values = (manifest.get(where[0]) or {}).get(where[1])
  name = ".".join(where)
  if values is None:
    return backfill((layers, len(UNITS)))
  if (
    not isinstance(values, list)
    or len(values) != layers
    or any(not isinstance(r, list) or len(r) != len(UNITS) for r in values)
  ):
    raise WeightImportError(f"{file}: {name} must be {layers} rows of {len(UNITS)} numbers")
  out = np.array([[_float_from_json(v, file) for v in r] for r in values], np.float32)
  if not ((out >= 0) & (out <= 1)).all():
    raise WeightImportError(f"{file}: {name} must lie in [0, 1]")
  return out


def config_overrides(manifest: dict[str, Any]) -> dict[str, Any]:
  return dict(manifest["model"])


def load_spec(path: str) -> Any:
  """The routing spec a model directory was trained for, or None if it does not say.

  Reads an exported directory's routing.json, an ir_jax checkpoint's
  ir_jax.json (`routing`) or a training workdir's run.json.
  """
  path = os.fspath(path)
  manifest = read_manifest(path)
  if manifest is not None:
    return spec_from_json(manifest.get("spec"), os.path.join(path, MANIFEST))
  if checkpoint.is_checkpoint(path):
    meta_file = os.path.join(path, checkpoint.META_FILE)
    meta = read_json_object(meta_file, checkpoint.CheckpointError)
    return spec_from_json(meta.get("routing"), meta_file)
  run_file = os.path.join(path, "run.json")
  if os.path.isfile(run_file):
    meta = read_json_object(run_file, ConfigError)
    return routing_spec((meta.get("config") or {}).get("routing") or {})
  return None
