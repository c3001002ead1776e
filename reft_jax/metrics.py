"""Metrics to workdir: one JSON line per logged step and TensorBoard event files (process 0 only).

Lines are appended whole: a failed write (a full disk) is cut back, and a torn last line that a killed run
left behind is cut when the file is opened again, so metrics.jsonl always parses line by line.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from reft_jax.files import append_line, repair_tail

log = logging.getLogger(__name__)


class MetricWriter:
  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._fd = self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    cut = repair_tail(self.path)
    if cut:
      log.warning("%s: cut a torn last line (%d bytes) that an interrupted run left", self.path, cut)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.active:
      return
    try:
      append_line(self._fd, json.dumps({"stage": prefix, "step": step, **metrics}) + "\n")
    except OSError as e:  # os.write names no file: name it
      raise OSError(e.errno, e.strerror, self.path) from e
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and k != "step":
          self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    if self._tb:
      self._tb.close()
