"""Weight import (HuggingFace safetensors directory, GGUF) into ir_jax checkpoints, and export
(`ir_jax.convert.export`) back to HuggingFace and the reference layout."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from ir_jax import checkpoint, forecast, tokenizer
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.convert import mapping, routing_io
from ir_jax.convert.sources import GGUFSource, HFSource, Source, WeightImportError
from ir_jax.model import abstract_model

FORMATS = ("hf", "gguf")


def routing_spec(path: str) -> Any:
  """The RoutingSpec an export directory, ir_jax checkpoint or training workdir was
  trained for (None when it does not say)."""
  return routing_io.load_spec(path)


def open_source(path: str, fmt: str | None = None, **config_overrides: Any) -> Source:
  """Opens a weight source; `fmt` None guesses from the path."""
  if fmt is None:
    fmt = "gguf" if str(path).endswith(".gguf") else "hf"
  if fmt == "hf":
    return HFSource(path, **config_overrides)
  if fmt == "gguf":
    return GGUFSource(path, **config_overrides)
  raise ValueError(f"unknown import format {fmt!r}; expected one of {FORMATS}")


def abstract_params(cfg: LlamaConfig) -> dict:
  """Pure dict of ShapeDtypeStructs: the whole state of a model of `cfg`
  (base weights, forecasters, routers, thresholds)."""
  return nnx.to_pure_dict(nnx.state(abstract_model(cfg)))


def init_routing_params(cfg: LlamaConfig, seed: int = 0) -> dict:
  """Freshly initialised forecasters, routers and thresholds (small; cheap to make)."""
  return nnx.to_pure_dict(nnx.state(forecast.routing_stack(cfg, nnx.Rngs(params=seed))))


def _get_in(tree: dict, path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set_in(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def read_params(
  source: Source, cfg: LlamaConfig | None = None, progress: Callable[[int, int], None] | None = None
) -> dict:
  """The base weights of `source` as a pure dict of numpy arrays in our layout.

  Every tensor's shape is checked against the config before it is read;
  `progress(tensors_read, tensors)` is called after each one.
  """
  cfg = cfg or source.config
  target = abstract_params(cfg)
  dtype = np.dtype(cfg.weight_dtype)
  out: dict = {}
  entries = list(mapping.entries(cfg.tie_word_embeddings))
  total = sum(cfg.num_layers if e.per_layer else 1 for e in entries)
  done = 0
  for e in entries:
    want = _get_in(target, e.path)
    layers = range(cfg.num_layers) if e.per_layer else [None]
    ours = want.shape[1:] if e.per_layer else want.shape
    slices = []
    for i in layers:
      key = e.hf.format(i=i)
      if not source.has(key):
        raise WeightImportError(
          f"{source.where(key)}: tensor {key!r} is missing (the config needs it)"
        )
      expect = mapping.hf_shape(e, tuple(ours))
      got = tuple(source.shape(key))
      if got != expect:
        raise WeightImportError(
          f"{source.where(key)}: tensor {key!r} has shape {list(got)}, "
          f"the config expects {list(expect)}"
        )
      slices.append(mapping.to_ours(e, source.get(key), tuple(ours)).astype(dtype))
      done += 1
      if progress is not None:
        progress(done, total)
    _set_in(out, e.path, np.stack(slices) if e.per_layer else slices[0])
  manifest = getattr(source, "routing", None)
  if manifest is not None:  # an ir_jax export: its trained forecasters, routers, thresholds
    out["routing"] = routing_io.read(source.path, manifest, cfg, target["routing"])
  return out


def model_from_params(cfg: LlamaConfig, params: dict, seed: int = 0) -> nnx.Module:
  """Builds the model around an existing parameter tree (no random init of the
  base weights); routing modules are initialised when `params` lacks them."""
  if "routing" not in params:
    params = {**params, "routing": init_routing_params(cfg, seed)}
  graphdef, state = nnx.split(abstract_model(cfg))
  params = jax.tree.map(lambda a: jax.numpy.asarray(a), params)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def import_weights(
  src: str,
  out: str,
  fmt: str | None = None,
  *,
  param_dtype: str | None = None,
  overwrite: bool = False,
  progress: Callable[[int, int], None] | None = None,
  log: Callable[[str], None] = lambda s: None,
) -> str:
  """Converts a HF directory or GGUF file into an ir_jax checkpoint directory
  (`progress` as in `read_params`; `log` gets a line per later phase)."""
  if jax.process_count() > 1:
    raise ConfigError(
      f"importing {src} needs one process, this is process {jax.process_index()} of "
      f"{jax.process_count()}; run python -m ir_jax.convert import on one host, then copy "
      "the checkpoint where every host reads it"
    )
  overrides = {"param_dtype": param_dtype} if param_dtype else {}
  source = open_source(src, fmt, **overrides)
  cfg = source.config
  params = read_params(source, cfg, progress)
  if "routing" not in params:
    params["routing"] = init_routing_params(cfg)  # untrained: forecasts ~0, like a skip
  provenance = {
    "source": os.path.abspath(src),
    "format": fmt or ("gguf" if src.endswith(".gguf") else "hf"),
  }
  manifest = getattr(source, "routing", None)
  routing = manifest.get("spec") if manifest is not None else None
  with tempfile.TemporaryDirectory() as tmp:
    if isinstance(source, GGUFSource):
      try:
        tok = tokenizer.tokenizer_from_gguf(source.reader)
        special = tokenizer.special_tokens_from_gguf(source.reader)
      except ValueError as e:
        raise WeightImportError(f"{src}: cannot rebuild its tokenizer ({e})") from None
      tokenizer.save_tokenizer(tok, tmp, special)
      tok_dir = tmp
    else:
      tok_dir = source.path
    log(f"writing {out} (orbax checkpoint + tokenizer) ...")
    return checkpoint.save(
      out,
      cfg,
      params,
      tokenizer_dir=tok_dir,
      provenance=provenance,
      overwrite=overwrite,
      routing=routing,
    )
