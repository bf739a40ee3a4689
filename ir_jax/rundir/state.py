"""The model state of a run: base weights and adapters, created sharded on a mesh.

Adapters (`ADAPTERS`: forecasters, routers, thresholds, capacity tables,
LoRA) are everything a run trains on top of the base weights; checkpoints hold
only them, so the helpers here split them off and put them back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ir_jax import checkpoint as model_ckpt
from ir_jax import sharding as sh
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.model import ADAPTERS, Llama

# Model fields that fix the shapes of the base weights: a workdir or base
# checkpoint must agree on these.
SHAPE_FIELDS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "tie_word_embeddings",
)
ADAPTER_FIELDS = ("lff_rank", "router_hidden", "lora_rank")


def shape_diff(a: LlamaConfig, b: LlamaConfig, fields: tuple[str, ...]) -> list[str]:
  """`field a vs b` for each of `fields` on which the two configs differ."""
  return [
    f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)
  ]


def _paths(tree: Any) -> dict[tuple, Any]:
  return {
    tuple(getattr(k, "key", getattr(k, "name", k)) for k in p): v
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _set_path(tree: dict, path: tuple, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


@dataclasses.dataclass
class ModelState:
  """A model as training holds it: its graph, its sharded state and each leaf's sharding."""

  graphdef: Any
  state: nnx.State  # the whole model state, sharded
  shardings: nnx.State  # NamedSharding per leaf


def abstract_state(cfg: LlamaConfig, mesh: jax.sharding.Mesh) -> tuple[Any, nnx.State, nnx.State]:
  """(graphdef, abstract state, shardings) of the model `cfg` on `mesh`; nothing is allocated."""
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(params=0))))
  return graphdef, abs_state, sh.state_shardings(abs_state, mesh)


def init_state(
  cfg: LlamaConfig, mesh: jax.sharding.Mesh, base: dict[str, Any], seed: int
) -> ModelState:
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

  adapters = fresh(ADAPTERS)
  if base["kind"] == "random":
    # Base weights of a model without LoRA, so that adding LoRA to a run does
    # not change the random base it trains on.
    seed = int(base.get("seed", seed))
    base_state = fresh(nnx.Not(ADAPTERS), cfg.replace(lora_rank=0))
    return ModelState(graphdef, nnx.merge_state(base_state, adapters), shardings)

  path = base["path"]
  ckpt_cfg = model_ckpt.load_config(path)
  diff = shape_diff(ckpt_cfg, cfg, SHAPE_FIELDS)
  if diff:
    raise ConfigError(
      f"the base checkpoint {path} does not match the config's model "
      f"({', '.join(diff)}); fix the model section or model.checkpoint"
    )
  # Restore the checkpoint's whole tree (orbax needs the saved structure), sharded
  # by the same rules, in the dtype this run wants for base weights.
  _, ck_abs, ck_sh = abstract_state(ckpt_cfg, mesh)
  wdt = cfg.weight_dtype
  target = jax.tree.map(
    lambda a, s_: jax.ShapeDtypeStruct(
      a.shape, wdt if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=s_
    ),
    nnx.to_pure_dict(ck_abs),
    nnx.to_pure_dict(ck_sh),
  )
  restored = _paths(model_ckpt.restore_params(path, target))
  base_abs, _ = nnx.split_state(abs_state, nnx.Not(ADAPTERS), ...)
  merged: dict = {}
  for p, want in _paths(nnx.to_pure_dict(base_abs)).items():
    got = restored.get(p)
    if got is None or got.shape != want.shape:
      raise model_ckpt.CheckpointError(
        f"{path}: parameter {'/'.join(map(str, p))} is "
        f"{'missing' if got is None else f'shaped {got.shape}, expected {want.shape}'}"
      )
    _set_path(merged, p, got)
  for p, v in _paths(nnx.to_pure_dict(adapters)).items():
    _set_path(merged, p, v)
  state = jax.tree.map(lambda x: x, abs_state)
  nnx.replace_by_pure_dict(state, merged)
  return ModelState(graphdef, state, shardings)


def split_adapters(model_state: ModelState) -> tuple[nnx.State, nnx.State]:
  """(adapters, everything else) of `ms`."""
  adapters, rest = nnx.split_state(model_state.state, ADAPTERS, ...)
  return adapters, rest


def adapter_target(model_state: ModelState) -> nnx.State:
  """Restore target for the adapters: ShapeDtypeStructs with their shardings."""
  adapters, _ = split_adapters(model_state)
  return sh.with_shardings(adapters, nnx.split_state(model_state.shardings, ADAPTERS, ...)[0])


def replace_adapters(model_state: ModelState, adapters: nnx.State) -> None:
  """Puts `adapters` into `ms` in place of its own."""
  _, rest = split_adapters(model_state)
  model_state.state = nnx.merge_state(rest, adapters)


def adopt_adapters(model_state: ModelState, other: ModelState) -> None:
  """Copies into `ms` every adapter leaf of `other` with the same path and shape
  (train.init_from); the others keep their fresh values."""
  adapters, _ = nnx.split_state(other.state, ADAPTERS, ...)
  mine, _ = split_adapters(model_state)
  have = _paths(nnx.to_pure_dict(adapters))
  merged = {}
  for p, v in _paths(nnx.to_pure_dict(mine)).items():
    src = have.get(p)
    _set_path(merged, p, src if src is not None and src.shape == v.shape else v)
  nnx.replace_by_pure_dict(mine, merged)
  replace_adapters(model_state, mine)
