"""Multi-process runs (a TPU pod, several GPU hosts, or processes on one machine): joining the job,
which process writes files, barriers, and gathering globally sharded arrays to the host.

Every process runs the same program on the same inputs (SPMD); only process 0 writes shared files
in the workdir, which must be a path every process sees (one disk, NFS, a gcsfuse mount).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """jax.distributed.initialize() from explicit values, else JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID, else the cluster's own detection (Cloud TPU, SLURM, Open MPI).
  Must run before anything touches a device."""
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  index = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  kw = {}
  if address:
    kw["coordinator_address"] = address
  if count:
    kw["num_processes"] = count
  if index >= 0:
    kw["process_id"] = index
  jax.distributed.initialize(**kw)


def is_primary() -> bool:
  """The one process that writes shared files (results, metrics, exports)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all arrive: a file process 0 just wrote is then readable by
  all. A no-op in a single process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def put(x: np.ndarray, sharding) -> jax.Array:
  """A host array (the same on every process) placed with `sharding`: each process copies only its
  own shards, without device_put's cross-process equality check."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x) -> np.ndarray:
  """The whole value of an array on every process. A globally sharded array (some shards on other
  processes' devices) is all-gathered first; anything else is a plain np.asarray."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


class StopVote:
  """Makes every process stop at the same step when a signal reached only some of them, without
  stalling the host: `cast(flag)` dispatches a max of the flags over processes on the devices and
  returns the result of the previous cast (one step late, like the metrics)."""

  def __init__(self):
    # One slot per device, processes contiguous, so each process fills its own slots.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices), ("all",))
    self._sharding = NamedSharding(mesh, P("all"))
    self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._pending = None

  def cast(self, flag: bool) -> bool:
    local = np.full((jax.local_device_count(),), int(flag), np.int32)
    votes = jax.make_array_from_process_local_data(self._sharding, local)
    previous, self._pending = self._pending, self._max(votes)
    return previous is not None and bool(np.asarray(previous.addressable_data(0)))
