"""Scalars to WORKDIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes. Event files come from tensorboardX (a required
dependency that needs no TensorFlow): `tensorboard --logdir WORKDIR`.
Object stores (gs://) cannot append: there metrics.jsonl is rewritten whole
(what it held before this start, then this start's rows) at most every
`REWRITE_SECONDS` and at the end, as tensorboardX does with its event files.
"""
import json
import os
import time
from typing import Mapping

import jax
import tensorboardX
from etils import epath

from byol_jax import storage

REWRITE_SECONDS = 30.0


class _RewrittenFile:
  """A text file on an object store, kept whole in memory and rewritten."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._text = path.read_text() if path.exists() else ""
    if self._text and not self._text.endswith("\n"):
      self._text += "\n"  # A row cut short by a kill ends here.
    self._written = time.monotonic()
    self._dirty = False

  def write(self, text: str) -> None:
    self._text += text
    self._dirty = True

  def flush(self, force: bool = False) -> None:
    if self._dirty and (force or
                        time.monotonic() - self._written >= REWRITE_SECONDS):
      self._path.write_text(self._text)
      self._written = time.monotonic()
      self._dirty = False

  def close(self) -> None:
    self.flush(force=True)


class MetricWriter:
  """Writes scalar metrics of a run; a context manager that closes itself."""

  def __init__(self, workdir: str | os.PathLike):
    self._enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self._enabled:
      return
    path = epath.Path(os.fspath(workdir))
    path.mkdir(parents=True, exist_ok=True)
    self._jsonl = (_RewrittenFile(path / "metrics.jsonl")
                   if storage.is_remote(path)
                   else (path / "metrics.jsonl").open("a"))
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
