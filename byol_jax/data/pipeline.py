"""The one batch iterator of both paths: global arrays, by step or by pass.

A path supplies `start(step)`, an iterator of this process's NumPy batches,
and optionally `finish`, a jitted function of the global batch. `Batches`
shards each over the mesh's `data` axis and keeps `prefetch` ready ahead.
"""
import collections
from typing import Callable, Iterator

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from byol_jax.core import sharding

LocalBatch = dict[str, np.ndarray]
GlobalBatch = dict[str, jax.Array]


def on_rows(mesh: Mesh, fn: Callable, num_replicated: int = 0) -> Callable:
  """`shard_map` of `fn` over each device's rows of the batch arguments
  (after `num_replicated` arguments that are whole on every device)."""
  rows = P(sharding.DATA_AXIS)
  return lambda *args: jax.shard_map(
      fn, mesh=mesh, in_specs=(P(),) * num_replicated + (rows,) * (
          len(args) - num_replicated), out_specs=rows)(*args)


class Batches:
  """Global batches of one mode of either path (`failures`: the host path's
  {step: elements that failed to decode})."""

  def __init__(self, mesh: Mesh, start: Callable[[int], Iterator[LocalBatch]],
               finish: Callable[[GlobalBatch], GlobalBatch] | None, *,
               num_examples: int, batch_size: int, start_step: int = 0,
               num_batches: int | None = None, prefetch: int = 2,
               failures: dict[int, int] | None = None):
    self.failures = failures
    self._mesh, self._start, self._finish = mesh, start, finish
    self.num_examples, self.batch_size = int(num_examples), int(batch_size)
    self.steps_per_epoch = max(1, self.num_examples // self.batch_size)
    self._num_batches, self._prefetch = num_batches, int(prefetch)
    self._next_step, self._it = start_step, None
    self._ready: collections.deque = collections.deque()

  def _fill(self, it: Iterator[LocalBatch], ready: collections.deque) -> None:
    while len(ready) <= self._prefetch:
      local = next(it, None)
      if local is None:
        return
      batch = sharding.global_batch(local, self._mesh)
      ready.append(self._finish(batch) if self._finish else batch)

  def failed_images(self, step: int) -> int:
    """Elements before `step` that failed to decode, over all processes (a
    collective)."""
    n = sum(v for s, v in (self.failures or {}).items() if s < step)
    if jax.process_count() > 1:
      n = int(np.sum(multihost_utils.process_allgather(np.int64(n))))
    return int(n)

  @property
  def ready_steps(self) -> tuple[int, ...]:
    """Steps whose global arrays are already built (the prefetched ones)."""
    return tuple(range(self._next_step, self._next_step + len(self._ready)))

  def batch(self, step: int) -> GlobalBatch:
    """The global batch of `step` (a jump restarts the stream there)."""
    if self._it is None or step != self._next_step:
      if self._it is not None:
        logging.info("Input pipeline: jumping from step %d to %d.",
                     self._next_step, step)
      self._it, self._next_step = self._start(step), step
      self._ready.clear()
    self._fill(self._it, self._ready)
    if not self._ready:
      raise RuntimeError(f"The input stream ended before step {step}.")
    self._next_step = step + 1
    return self._ready.popleft()

  def __iter__(self) -> Iterator[GlobalBatch]:
    """One pass (eval mode): every example once with mask True, padded."""
    it, ready = self._start(0), collections.deque()
    self._fill(it, ready)
    while ready:
      yield ready.popleft()
      self._fill(it, ready)

  def __len__(self) -> int:
    if self._num_batches is None:
      raise TypeError("Training batches have no length; use batch(step).")
    return self._num_batches
