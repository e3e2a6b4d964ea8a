"""Device mesh and parameter shardings from logical axis names.

Parameters carry logical axis names (`nnx.Param(..., axes=("embed", "mlp"))` in model.py); the run
config maps them to mesh axes with `rules`, as in MaxText and the Flax lm1b example. The batch is
split over ("data", "fsdp"): fsdp shards parameters and batch together (ZeRO-3 style), tensor
shards heads and the MLP width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or None = replicated). A rule is skipped for a dimension the mesh
# axis does not divide (e.g. 2 KV heads over tensor=4): that dimension is then replicated.
DEFAULT_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("position", None),
    ("norm", None),
)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
  """A mesh of `shape` over all devices; one entry may be -1 (whatever devices remain)."""
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} does not match mesh axes {tuple(axes)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)} has more than one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, but "
                     f"{len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
  rule_map = dict(rules)
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    mesh_axis = rule_map.get(name)
    if (mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1
        or dim % mesh.shape[mesh_axis]):
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """NamedShardings, as a pure dict shaped like `nnx.to_pure_dict(state)`."""
  def one(var):
    shape = var.get_value().shape
    axes = var.get_metadata().get("axes") or (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))
  specs = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shardings_like_params(tree, params, default: NamedSharding):
  """Shardings for `tree` (e.g. an optimizer state) whose leaves mirror `params`' leaves.

  A leaf whose key path ends with a parameter's key path, and which has that parameter's shape
  (Adam's mu and nu), gets its sharding; every other leaf (step counts) gets `default`. Matching
  paths, unlike optax.tree_map_params, copes with the MaskedNode that a frozen parameter leaves
  in a multi_transform state in place of its moments.
  """
  by_path = {tuple(path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}

  def one(path, leaf):
    for start in range(len(path)):
      param = by_path.get(tuple(path[start:]))
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return default
  return jax.tree_util.tree_map_with_path(one, tree)
