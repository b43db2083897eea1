"""Scalars to stdout, WORKDIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes. Event files are written with the `tensorboard`
package's protos and record framing, without TensorFlow (importing it costs
seconds at every start, and GPU images often lack it); without `tensorboard`
(`pip install byol_jax[tf]`) the JSON-lines file is still written.
"""
import json
import os
import socket
import time
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
      self._tb = _EventFile(path)
    except ImportError:
      logging.warning("TensorBoard is not installed: no event files, metrics "
                      "go to metrics.jsonl only.")

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records `metrics` at `step` (floats)."""
    if not self._enabled:
      return
    self._jsonl.write(json.dumps(
        {"step": int(step), **{k: float(v) for k, v in metrics.items()}})
                      + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.write_scalars(step, metrics)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _EventFile:
  """One TensorBoard event file of scalar summaries (simple_value)."""

  def __init__(self, path: epath.Path):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.summary.writer import record_writer
    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    # TensorBoard's own naming; the pid keeps restarts in separate files.
    name = (f"events.out.tfevents.{int(time.time()):010d}."
            f"{socket.gethostname()}.{os.getpid()}.0")
    self._writer = record_writer.RecordWriter((path / name).open("wb"))
    self._write(self._event_pb2.Event(wall_time=time.time(),
                                      file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._writer.write(event.SerializeToString())
    self._writer.flush()

  def write_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in metrics.items()]
    self._write(self._event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=self._summary_pb2.Summary(value=values)))

  def close(self) -> None:
    self._writer.close()
