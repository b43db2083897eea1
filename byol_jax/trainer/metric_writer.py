"""Scalars to WORKDIR/metrics.jsonl and TensorBoard (tensorboardX) events.

Only process 0 writes. On object stores (gs://), which cannot append,
metrics.jsonl is rewritten whole at most every REWRITE_SECONDS. A failed
write is one StorageError, and metrics.jsonl never ends in half a line.
"""
import contextlib
import json
import os
import threading
import time
from typing import Mapping

import jax
import tensorboardX
from absl import logging
from etils import epath

from byol_jax import storage
from byol_jax.errors import StorageError

REWRITE_SECONDS = 30.0


class _RewrittenFile:
  """A file on an object store, kept in memory and rewritten whole."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._data = path.read_bytes() if path.exists() else b""
    if self._data and not self._data.endswith(b"\n"):
      self._data += b"\n"  # A row cut short by a kill ends here.
    self._written = time.monotonic()
    self._dirty = False

  def write(self, data) -> int:
    self._data += bytes(data)
    self._dirty = True
    return len(data)

  def tell(self) -> int:
    return len(self._data)

  def flush(self, force: bool = False) -> None:
    if self._dirty and (force or
                        time.monotonic() - self._written >= REWRITE_SECONDS):
      self._path.write_bytes(self._data)
      self._written = time.monotonic()
      self._dirty = False

  def close(self) -> None:
    self.flush(force=True)


def _is_tensorboardx(thread) -> bool:
  return type(thread).__module__.startswith("tensorboardX")


def logged(workdir, key: str) -> list[tuple[int, float]]:
  """(step, value) of `key` in WORKDIR/metrics.jsonl's rows, in file order;
  unreadable files and cut rows are skipped."""
  path = epath.Path(os.fspath(workdir)) / "metrics.jsonl"
  try:
    lines = path.read_text().splitlines() if path.exists() else []
  except OSError as e:  # Only ever advice or a clock: never a reason to stop.
    logging.warning("Cannot read %s: %s", path, e)
    lines = []
  rows = []
  for line in lines:
    try:
      row = json.loads(line)
      rows.append((int(row["step"]), float(row[key])))
    except (ValueError, KeyError, TypeError):
      continue
  return rows


class MetricWriter:
  """Writes scalar metrics of a run; a context manager that closes itself."""

  def __init__(self, workdir: str | os.PathLike):
    self._jsonl = self._tb = None  # None: not process 0, or closed.
    self._failure: BaseException | None = None
    if jax.process_index() != 0:
      return
    path = epath.Path(os.fspath(workdir))
    self._path = path / "metrics.jsonl"
    path.mkdir(parents=True, exist_ok=True)
    # Unbuffered: each line is one write, so a failure is seen at once.
    self._jsonl = (_RewrittenFile(self._path) if storage.is_remote(path) else
                   open(os.fspath(self._path), "ab", buffering=0))
    self._size = self._jsonl.tell()  # Appending: at the end.
    # A failure on tensorboardX's thread is raised by the next `write`.
    self._previous_hook = threading.excepthook
    threading.excepthook = self._thread_failed
    # A queue that never fills: `add_scalar` never blocks on a dead thread.
    self._tb = tensorboardX.SummaryWriter(os.fspath(path), flush_secs=30,
                                          max_queue=100_000)

  def _thread_failed(self, args) -> None:
    if _is_tensorboardx(args.thread):
      self._failure = args.exc_value
      return
    self._previous_hook(args)

  def _failed(self, e: BaseException, what: str) -> StorageError:
    return StorageError(
        f"Writing {what} in {self._path.parent} failed ({type(e).__name__}: "
        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); the "
        "lines and checkpoints written before are intact: free space or fix "
        "the storage, then run the same command again to resume.")

  def _append(self, line: bytes) -> None:
    view = memoryview(line)
    try:
      while view:
        view = view[self._jsonl.write(view):]
    except OSError:  # Only the partial line goes; every earlier one stays.
      with contextlib.suppress(OSError):
        self._jsonl.truncate(self._size)
      raise
    self._size += len(line)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records `metrics` (floats) at `step`; StorageError if that fails."""
    if self._jsonl is None:
      return
    if self._failure is not None:
      raise self._failed(self._failure, "TensorBoard events")
    values = {k: float(v) for k, v in metrics.items()}
    try:
      self._append((json.dumps({"step": int(step), **values}) + "\n").encode())
      self._jsonl.flush()  # A no-op on local files (unbuffered).
    except OSError as e:
      raise self._failed(e, "metrics.jsonl") from e
    for k, v in values.items():
      self._tb.add_scalar(k, v, global_step=int(step))

  def close(self) -> None:
    """Closes the files (raises StorageError if the last events fail)."""
    if self._jsonl is None:
      return
    jsonl, tb = self._jsonl, self._tb
    self._jsonl = self._tb = None
    try:
      jsonl.close()
      tb.close()
    except OSError as e:
      raise self._failed(e, "TensorBoard events") from e
    finally:
      # A tensorboardX thread still failing keeps reporting to us.
      if not any(_is_tensorboardx(t) and t.is_alive()
                 for t in threading.enumerate()):
        threading.excepthook = self._previous_hook
    if self._failure is not None:
      raise self._failed(self._failure, "TensorBoard events")

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    try:
      self.close()
    except StorageError:
      if exc_type is None:  # Else the error on its way out is the one shown.
        raise
