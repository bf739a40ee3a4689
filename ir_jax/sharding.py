"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter of the model carries logical axis names (`ir_jax.model.Ax`,
plus "lff", "router", "units", "score" on routing modules and "lora" on
adapters). `RULES` below says which mesh axis each name is split over; a
dimension that the mesh axis does not divide is replicated instead (so
SmolLM2's 3 KV heads still run on a 4-way tensor axis). Batches are split
over `BATCH_AXES`.

Activations are pinned with `constrain(x, logical_axes)` (the residual
stream, gathered rows, logits: batch over `BATCH_AXES`), through the same
table; it does nothing unless a mesh is active (a step wrapped in
`with_mesh(fn, mesh)` before jit, or `use_mesh(mesh)` around the trace), so
the model also runs without any mesh.

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  Megatron-style model parallelism over heads and the MLP width
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ir_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (None: replicated). One table for the whole model.
RULES: tuple[tuple[str, str | None], ...] = (
  ("batch", BATCH_AXES),
  ("layers", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("lff", None),
  ("router", None),
  ("units", None),
  ("score", None),
  ("lora", None),
  # Activation-only names: the embed / feature dim of activations stays whole.
  ("act_embed", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 on one axis fills it with the remaining devices."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self) -> None:
    sizes = [getattr(self, a) for a in MESH_AXES]
    for a, v in zip(MESH_AXES, sizes):
      if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
        raise ConfigError(f"mesh.{a} must be a positive integer or -1 (fill), got {v!r}")
    if sizes.count(-1) > 1:
      raise ConfigError(
        f"at most one mesh axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes))}"
      )

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """The concrete (data, fsdp, tensor) sizes for `num_devices` devices."""
    sizes = [getattr(self, a) for a in MESH_AXES]
    fixed = math.prod(v for v in sizes if v != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ConfigError(
          f"mesh {self.describe()} does not divide the {num_devices} devices: the fixed axes "
          f"take {fixed}; choose sizes whose product divides {num_devices}"
        )
      sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
      raise ConfigError(
        f"mesh {self.describe()} needs {fixed} devices but {num_devices} are available; "
        "set one axis to -1 to fill, or sizes whose product is the device count"
      )
    return tuple(sizes)  # type: ignore[return-value]

  def describe(self) -> str:
    return "x".join(f"{a}={getattr(self, a)}" for a in MESH_AXES)

  @classmethod
  def from_config(cls, mesh_cfg: Any) -> "MeshConfig":
    d = mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else dict(mesh_cfg or {})
    unknown = sorted(set(d) - set(MESH_AXES))
    if unknown:
      raise ConfigError(f"unknown mesh config fields {unknown}; known: {list(MESH_AXES)}")
    return cls(**d)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), Auto axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_cfg.shape(len(devices))
  arr = None
  if devices and devices[0].platform != "cpu":
    # Topology-aware device order for TPU/GPU (ICI neighbours share the inner axes).
    # A tensor axis of 2 on a 4x4 torus splits a physical axis; allow that, and fall
    # back to the plain device order when no assignment exists at all.
    from jax.experimental import mesh_utils

    try:
      arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError):
      arr = None
  if arr is None:
    arr = np.array(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh(
  logical: Sequence[str | None],
  shape: Sequence[int],
  mesh: Mesh,
  rules: Sequence[tuple[str, Any]] = RULES,
) -> PartitionSpec:
  """The PartitionSpec for an array of `shape` whose dims have `logical` names.

  Unknown names raise (a new parameter must get a rule). A mesh axis that
  does not divide its dimension, or is already used by an earlier dimension,
  is dropped (that dimension is replicated).
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, size in zip(logical, shape):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"no sharding rule for logical axis {name!r}; add it to ir_jax.sharding.RULES")
    axes = table[name]
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
    if not axes or size % mesh_axis_size(mesh, axes):
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of an (abstract) nnx.State, from its axis names."""
  specs = nnx.get_partition_spec(abstract_state)

  def one(leaf, spec):
    names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
    names = names + (None,) * (len(leaf.shape) - len(names))
    return NamedSharding(mesh, logical_to_mesh(names, leaf.shape, mesh))

  return jax.tree.map(one, abstract_state, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (a restore target)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
  """Makes `mesh` the context of `constrain` (jax.set_mesh); None: no-op."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh):
    yield


def with_mesh(fn: Callable[..., Any], mesh: Mesh | None) -> Callable[..., Any]:
  """`fn` run (traced) with `mesh` as the abstract mesh, so `constrain` inside it takes
  effect; jit the result. None: `fn` itself."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by its dims' logical names (RULES); no-op without a mesh.

  The mesh is the one set with `use_mesh` / `jax.set_mesh` (e.g. around a jit
  trace); plain calls outside any mesh return `x` unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  spec = logical_to_mesh(tuple(logical) + (None,) * (x.ndim - len(logical)), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_spec(ndim: int) -> PartitionSpec:
  return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
