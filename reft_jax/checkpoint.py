"""Orbax checkpoints of the trainable state and the data position.

Restoring goes through an abstract target that carries the *current* mesh's shardings, so a
checkpoint written on one mesh restores onto another. Saves are atomic (orbax writes to a temporary
directory and renames), so an interrupted save never corrupts the last good checkpoint.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, every_steps: int = 0, max_to_keep: int = 2, async_save: bool = True):
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
    )

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, tree, meta: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, like) -> tuple[object, dict]:
    """Restores onto the shardings of `like` (concrete arrays or ShapeDtypeStructs)."""
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like
    )
    out = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return out["state"], out["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
