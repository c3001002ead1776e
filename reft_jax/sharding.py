"""Device mesh and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any
from collections.abc import Sequence

import jax
from flax import nnx, traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: dict[str, Any] = {
  "batch": ("data", "fsdp"),
  "vocab": "tensor",
  "embed": "fsdp",
  "heads": "tensor",
  "kv_heads": "tensor",
  "mlp": "tensor",
  "kv": None,
  "layers": None,
  "norm": None,
  "lora": None,
}


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 to the remaining devices; errors name the sizes."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes data={data} fsdp={fsdp} tensor={tensor}: use positive sizes and at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"mesh data={data} x fsdp={fsdp} x tensor={tensor}: {num_devices} devices are not divisible by {known}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
      f"{math.prod(sizes)} devices, but {num_devices} are available"
    )
  return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 and takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def parse_rules(overrides: str = "") -> dict[str, Any]:
  """DEFAULT_RULES updated by 'name=axis,name=axis1+axis2,name=none' (from the config)."""
  rules = dict(DEFAULT_RULES)
  for item in filter(None, (s.strip() for s in overrides.split(","))):
    name, sep, axes = item.partition("=")
    if not sep:
      raise ValueError(f"sharding rule {item!r}: expected logical=mesh_axis")
    parts = tuple(a for a in axes.split("+") if a and a.lower() != "none")
    if any(a not in MESH_AXES for a in parts):
      raise ValueError(f"sharding rule {item!r}: mesh axes must be among {MESH_AXES} or none")
    rules[name.strip()] = parts[0] if len(parts) == 1 else (parts or None)
  return rules


def logical_to_spec(
  axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict[str, Any] | None = None
) -> P:
  """PartitionSpec for an array; mesh axes that do not divide a dimension (e.g. 2 KV heads on a
  tensor axis of 4) or that an earlier dimension already uses are dropped, i.e. replicated."""
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name else None
    target = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for ax in target:
      size = mesh.shape[ax]
      if ax not in used and dim % (size * math.prod(mesh.shape[a] for a in kept)) == 0:
        kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None) -> dict:
  """NamedShardings for the Variables of an (abstract) nnx.State, as a pure nested dict (the
  layout of `nnx.to_pure_dict(state)`)."""
  flat = {}
  for path, v in state.flat_state():
    axes = v.get_metadata().get("logical_axes") or (None,) * v.value.ndim
    flat[tuple(path)] = NamedSharding(mesh, logical_to_spec(axes, v.value.shape, mesh, rules))
  return traverse_util.unflatten_dict(flat)


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 2) -> NamedSharding:
  rules = DEFAULT_RULES if rules is None else rules
  return NamedSharding(mesh, P(rules["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------- activations
#
# Params and batch inputs are sharded by the jit's in_shardings, but nothing tells XLA how to lay out the
# activations in between; left alone it may all-gather the whole batch onto every device (fsdp) instead of
# all-gathering the weights. `constrain` pins activations to the same rules (batch over data+fsdp).

_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("reft_jax_activations", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict[str, Any] | None = None):
  """While active, `constrain` shards activations on `mesh` with `rules`. Unlike jax.set_mesh it may be
  entered inside a function being traced (how train.jit_step uses it), so it binds to that one trace."""
  token = _ACTIVATIONS.set((mesh, DEFAULT_RULES if rules is None else rules))
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def active_mesh() -> tuple[Any, dict[str, Any]] | None:
  """(mesh, rules) from `activation_sharding`, else jax.set_mesh's abstract mesh with DEFAULT_RULES;
  None with neither (single device, plain eager use)."""
  ctx = _ACTIVATIONS.get()
  if ctx is not None:
    return ctx
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else (mesh, DEFAULT_RULES)


def constrain(x, axes: Sequence[str | None], claim_order: Sequence[int] | None = None):
  """x with a sharding constraint from its logical `axes` (as logical_to_spec: axes that do not divide
  are dropped). claim_order: the dims in the order they claim mesh axes (default left to right). The
  mesh and rules come from `activation_sharding`, else the mesh of jax.set_mesh with DEFAULT_RULES;
  with neither (single device, plain eager use) x is returned unchanged."""
  mesh_rules = active_mesh()
  if mesh_rules is None:
    return x
  mesh, rules = mesh_rules
  order = tuple(range(x.ndim)) if claim_order is None else tuple(claim_order)
  claimed = logical_to_spec([axes[i] for i in order], [x.shape[i] for i in order], mesh, rules)
  spec = [None] * x.ndim
  for i, s in zip(order, claimed):
    spec[i] = s
  # A concrete mesh is named (the trace may have none in context); an abstract one is the context's.
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)) if isinstance(mesh, Mesh) else P(*spec))
