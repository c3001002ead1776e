"""Orbax checkpoints of the trainable state and the data position.

Restoring goes through an abstract target that carries the *current* mesh's shardings, so a
checkpoint written on one mesh restores onto another. Saves are atomic (orbax writes to a temporary
directory and renames), so an interrupted save never corrupts the last good checkpoint. Resuming takes the
newest checkpoint that restores with finite values: newer ones that do not (a deleted or truncated file, an
emptied directory) are named in a warning and moved beside the directory, never deleted.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from reft_jax import distributed as dist

log = logging.getLogger(__name__)


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

  def restore_latest(self, like) -> tuple[int, object, dict] | None:
    """(step, tree, meta) of the newest checkpoint that restores onto `like` with finite values, or None when
    there is none. Newer ones that fail are moved to <directory>.corrupt/ with a warning; when every one
    fails nothing is moved (a config that no longer fits them looks the same) and ValueError says so."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        tree, meta = self.restore(step, like)
      except Exception as e:  # orbax and TensorStore raise many types for a missing or truncated file
        failed.append((step, f"{type(e).__name__}: {_first_line(e)}"))
        continue
      if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)):
        failed.append((step, "holds NaN/inf values (a diverged state)"))
        continue
      self._set_aside([(s, f"does not restore ({why}); resuming from step {step}") for s, why in failed])
      return step, tree, meta
    if failed:
      reasons = "; ".join(f"{s}: {why}" for s, why in failed)
      raise ValueError(
        f"{self.manager.directory}: no checkpoint restores ({reasons}); move the directory away to train "
        "this stage from the start"
      )
    return None

  def discard(self, step: int, why: str) -> None:
    """Sets checkpoint `step` aside, if it was saved: its state turned out unusable after the save (the step
    that started from it gave a NaN gradient)."""
    self.manager.wait_until_finished()
    if step in self.manager.all_steps():
      self._set_aside([(step, why)])

  def _set_aside(self, failed: list[tuple[int, str]]) -> None:
    """Moves each (step, why) to <directory>.corrupt/<step> with a warning: kept for a look, never deleted."""
    if not failed:
      return
    root = str(self.manager.directory)
    aside = root.rstrip("/") + ".corrupt"
    for step, why in failed:
      log.warning("checkpoint %s/%d %s; moved to %s/%d", root, step, why, aside, step)
    if dist.is_primary():
      os.makedirs(aside, exist_ok=True)
      for step, _ in failed:
        target = os.path.join(aside, str(step))
        while os.path.exists(target):  # an earlier run set the same step aside: keep both
          target += "_"
        os.replace(os.path.join(root, str(step)), target)
    dist.barrier("checkpoint_set_aside")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: Exception) -> str:
  line = (str(e).strip().splitlines() or [""])[0]
  return line[:200] + ("..." if len(line) > 200 else "")
