"""Scalars to WORKDIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes. Event files come from tensorboardX (a required
dependency that needs no TensorFlow): `tensorboard --logdir WORKDIR`.
"""
import json
import os
from typing import Mapping

import jax
import tensorboardX
from etils import epath


class MetricWriter:
  """Writes scalar metrics of a run; a context manager that closes itself."""

  def __init__(self, workdir: str | os.PathLike):
    self._enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self._enabled:
      return
    path = epath.Path(os.fspath(workdir))
    path.mkdir(parents=True, exist_ok=True)
    self._jsonl = (path / "metrics.jsonl").open("a")
    self._tb = tensorboardX.SummaryWriter(os.fspath(path), flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records `metrics` (floats) at `step`."""
    if not self._enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, global_step=int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
