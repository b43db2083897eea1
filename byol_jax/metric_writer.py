"""Scalars to stdout, WORKDIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes. TensorBoard needs TensorFlow (`pip install
byol_jax[tf]`); without it the JSON-lines file is still written.
"""
import json
import os
from typing import Mapping

import jax
from absl import logging
from etils import epath


class MetricWriter:
  """Writes scalar metrics of a run."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self._enabled:
      return
    workdir = os.fspath(workdir)
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    self._jsonl = (path / "metrics.jsonl").open("a")
    try:
      import tensorboard  # pylint: disable=g-import-not-at-top,unused-import
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(workdir)
    except ImportError:
      logging.warning("TensorFlow or TensorBoard is not installed: no event "
                      "files, metrics go to metrics.jsonl only.")

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records `metrics` at `step` (floats)."""
    if not self._enabled:
      return
    self._jsonl.write(json.dumps(
        {"step": int(step), **{k: float(v) for k, v in metrics.items()}})
                      + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      with self._tb.as_default():
        for k, v in metrics.items():
          self._tf.summary.scalar(k, float(v), step=int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
