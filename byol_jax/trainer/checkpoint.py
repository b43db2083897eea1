"""Orbax checkpoints of the train state: when to save, saving, restoring.

Layout: WORKDIR/checkpoints/<step>/{state, config, checksums}. `state` is the
whole `TrainState` pytree; `config` is the run's resolved config as JSON (a
checkpoint is self-contained: `load_encoder` needs nothing else); `checksums`
holds one 32-bit sum per leaf (`checksums.py`), computed on the devices at
save time and verified after every restore, so that flipped bytes that still
decode are caught.

- When: Orbax's save-decision policies, which touch no device: a fixed step
  interval, a minimum time interval (decided by process 0 at log steps and
  shared through the coordination service) and preemption (SIGTERM, or
  JAX's preemption sync point on several processes).
- Saving is asynchronous and atomic (a step appears only when complete). A
  save that failed in the background is reported at the next log step or
  save (`check_for_errors`), as `StorageError`.
- Restoring first compares the saved layout (tree, shapes, dtypes) with
  the expected state: a difference is one error line, nothing moved. It
  then places every array as the restoring run needs (any number of
  processes and devices). Only real damage, decided from facts
  (`checkpoint_facts`: missing, truncated or undecodable files, or a
  checksum that does not match) moves a checkpoint to
  WORKDIR/checkpoints_damaged/; other errors are retried and then stop the
  run, moving nothing.
"""
import copy
import dataclasses
import datetime
import json
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from byol_jax.trainer import checkpoint_facts
from byol_jax.trainer import checksums
from byol_jax.trainer import config_lib
from byol_jax.errors import StorageError

ITEMS = ("state", "config", "checksums")
_RESTORE_ATTEMPTS = 3
_RETRY_SECONDS = 2.0
DamagedCheckpointError = checkpoint_facts.DamagedCheckpointError
LayoutError = checkpoint_facts.LayoutError


def as_path(path: str | os.PathLike) -> epath.Path:
  """A local path made absolute, or a bucket path (gs://...) as it is."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


def _fill_missing(d: dict, defaults: dict) -> None:
  for key, value in defaults.items():
    if key not in d:
      d[key] = value
    elif isinstance(value, dict) and isinstance(d[key], dict):
      _fill_missing(d[key], value)


def config_from_json(d: dict) -> ml_collections.ConfigDict:
  """Inverse of `config_to_json`, with crop ranges as tuples again.

  Fields the config lacks (a checkpoint written before they existed, e.g.
  `model.padding`) take their `config_lib.base_config()` defaults.
  """
  d = copy.deepcopy(dict(d))
  # Written before optimizer.classifier existed: the classifier had its own
  # SGD then (so a SimSiam or SimCLR run resumes as it was).
  if isinstance(d.get("optimizer"), dict):
    d["optimizer"].setdefault("classifier", "sgd")
  _fill_missing(d, config_to_json(config_lib.base_config()))
  config = ml_collections.ConfigDict(d)
  for key in ("crop_scale", "crop_ratio"):
    if key in config.data:
      config.data[key] = tuple(config.data[key])
  return config


# ------------------------------------------------------- save decisions ----
@dataclasses.dataclass(frozen=True)
class _Start:
  """The start of the run, as a `PolicyCheckpointInfo` (time counts from it)."""
  step: int
  time: datetime.datetime
  metrics: Any = None


@dataclasses.dataclass
class _AtSteps(policies.SaveDecisionPolicy):
  """Asks `inner` only at multiples of `every` (where the loop syncs anyway).

  The minimum-time policy decides on process 0 and shares the answer through
  the coordination service, a host round trip: at log steps it costs nothing
  extra. Before the first checkpoint, time counts from `start`.
  """
  inner: policies.SaveDecisionPolicy
  every: int
  start: _Start

  def should_save(self, step, previous_steps, *, context) -> bool:
    if step.step % self.every:
      return False
    return self.inner.should_save(step, list(previous_steps) or [self.start],
                                  context=context)


@dataclasses.dataclass
class _Preemption(policies.SaveDecisionPolicy):
  """Saves at preemption and remembers it: SIGTERM (one process) or JAX's
  preemption sync point (several processes; Orbax passes it in `context`)."""
  requested: bool = False   # Set by the SIGTERM handler.
  reached: bool = False

  def should_save(self, step, previous_steps, *, context) -> bool:
    del step, previous_steps
    self.reached = self.reached or context.reached_preemption or (
        self.requested and jax.process_count() == 1)
    return self.reached


# ----------------------------------------------------------- the manager ----
class Checkpointer:
  """Decides, saves and restores the train state of one run.

  Every process creates it and calls the same methods in the same order
  (Orbax coordinates the writes of a multi-host run).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               start_step: int = 0, read_only: bool = False):
    """Opens (or creates) WORKDIR/checkpoints.

    Args:
      workdir: the run's directory (local path or a bucket).
      config: reads keep_checkpoints, checkpoint_every_steps,
        checkpoint_every_minutes and log_every_steps; saved beside every
        state.
      start_step: the step the run starts from (time-based saves count from
        now and this step until the first checkpoint).
      read_only: open existing checkpoints for reading only.
    """
    self.directory = as_path(workdir) / "checkpoints"
    self._config_json = config_to_json(config)
    self._preemption = _Preemption()
    rules: list[policies.SaveDecisionPolicy] = [self._preemption]
    if config.checkpoint_every_steps > 0:
      rules.append(policies.FixedIntervalPolicy(
          int(config.checkpoint_every_steps)))
    if config.checkpoint_every_minutes > 0:
      start = _Start(step=start_step,
                     time=datetime.datetime.now(datetime.timezone.utc))
      rules.append(_AtSteps(
          policies.ContinuousCheckpointingPolicy(
              minimum_interval_secs=int(60 * config.checkpoint_every_minutes)),
          every=max(int(config.log_every_steps), 1), start=start))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=not read_only,
            read_only=read_only, enable_async_checkpointing=True,
            save_decision_policy=policies.AnySavePolicy(rules)),
        item_handlers=_handlers())
    self._previous_sigterm = None
    self._said = set(self._manager.all_steps())

  # ---------------------------------------------------------- preemption ----
  def __enter__(self):
    """Turns SIGTERM into a save at the next step (one process)."""
    if jax.process_count() == 1:  # jax.distributed handles it on several.
      self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._preemption.requested = True

  def __exit__(self, exc_type, exc, tb):
    if self._previous_sigterm is not None:
      signal.signal(signal.SIGTERM, self._previous_sigterm)
      self._previous_sigterm = None
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      if exc_type is None:
        raise StorageError(f"Finishing the last checkpoint in "
                           f"{self.directory} failed "
                           f"({checkpoint_facts.describe(e)}).") from e
      logging.warning("Finishing the last checkpoint failed too: %s", e)

  @property
  def preempted(self) -> bool:
    """Whether the last `should_save` decided to save because of preemption."""
    return self._preemption.reached

  # -------------------------------------------------------------- saving ----
  def should_save(self, step: int) -> bool:
    """Whether to save after `step`: host-only, the same on every process."""
    return self._manager.should_save(step)

  def _saved_or_raise(self, wait_fn) -> None:
    """wait_fn(); a failure of a background save becomes StorageError."""
    try:
      wait_fn()
    except Exception as e:  # pylint: disable=broad-except
      raise StorageError(
          f"Saving a checkpoint to {self.directory} failed "
          f"({checkpoint_facts.describe(e)});"
          " check that the workdir is writable and has space, then run the "
          "same command again to resume from the last checkpoint.") from e

  def check_for_errors(self) -> None:
    """Raises StorageError if a background save failed (never blocks)."""
    self._saved_or_raise(self._manager.check_for_errors)

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of `state` at `step` (no-op if it exists).

    Raises:
      StorageError: if the previous save failed or this one cannot start.
    """
    # The previous save had a whole interval to finish: waiting for it costs
    # nothing, and a failure in the background surfaces here, at once.
    self._saved_or_raise(self._manager.wait_until_finished)
    self.check_for_errors()
    if step in self._manager.all_steps():
      return
    sums = checksums.compute(state)
    if jax.process_count() == 1:
      # One blocking copy to host, then Orbax writes NumPy in the background.
      # On one process device arrays cost far more on their first save; a
      # multi-host state is not fully addressable and is saved as it is.
      state = jax.device_get(state)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          config=ocp.args.JsonSave(self._config_json),
          checksums=ocp.args.JsonSave(sums)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise StorageError(
          f"Cannot save checkpoint {step} to {self.directory} "
          f"({checkpoint_facts.describe(e)}); check that the workdir is "
          "writable and has space, then run the same command again to "
          "resume.") from e

  def say_committed(self, say) -> None:
    """Says 'step N: checkpoint -> DIR/N' once for each save that committed
    (none while one is in flight; raises StorageError if one failed)."""
    self.check_for_errors()
    if self._manager.is_saving_in_progress():
      return
    for step in sorted(set(self._manager.all_steps()) - self._said):
      # Committed: Orbax writes commit_success.txt last, under the final
      # name (the manager's list also holds saves that failed).
      if (self.directory / str(step) / "commit_success.txt").exists():
        self._said.add(step)
        say(f"step {step}: checkpoint -> {self.directory}/{step}")

  def wait(self) -> None:
    """Blocks until every started save is on disk (raises StorageError)."""
    self._saved_or_raise(self._manager.wait_until_finished)
    self.check_for_errors()

  def close(self) -> None:
    """Finishes the save in flight (so no partial step is left) and closes."""
    try:
      self._manager.wait_until_finished()
    finally:
      self._manager.close()

  # ----------------------------------------------------------- restoring ----
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def saved_config(self, step: int) -> ml_collections.ConfigDict:
    """The config saved with checkpoint `step` (raises DamagedCheckpointError)."""
    restored = self._with_retries(lambda: self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())))
    return config_from_json(restored.config)

  def restore(self, abstract_state: Any, step: int) -> Any:
    """Restores checkpoint `step` into the layout of `abstract_state`.

    Args:
      abstract_state: ShapeDtypeStructs (with shardings) of the state.
      step: the checkpoint to read.

    Returns:
      The state, each leaf placed with the sharding of `abstract_state`.

    Raises:
      DamagedCheckpointError: unreadable or inconsistent files, or contents
        whose checksum does not match the one written at save time.
      StorageError: the storage kept failing (nothing was moved).
    """
    self.check_layout(abstract_state, step)

    def read():
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          checksums=ocp.args.JsonRestore()))
    restored = self._with_retries(read)
    # States saved from host copies come back on one device: place them as
    # the abstract state says (replicated over the mesh).
    state = jax.tree.map(_place, restored.state, abstract_state)
    expected = restored.checksums
    if expected is not None:
      got = checksums.compute(state)
      bad = sorted(k for k in expected if got.get(k) != expected[k])
      if bad or got.keys() != expected.keys():
        raise DamagedCheckpointError(
            f"checkpoint {step}: contents do not match the checksums written "
            f"at save time ({len(bad)} leaves differ, e.g. {bad[:2]})")
    return state

  def check_layout(self, abstract_state: Any, step: int) -> None:
    """Checkpoint `step`'s saved tree, shapes and dtypes (Orbax's metadata)
    against `abstract_state` (`checkpoint_facts.check_layout`)."""
    checkpoint_facts.check_layout(
        self._with_retries(lambda: self._manager.item_metadata(step).state),
        abstract_state, f"{self.directory}/{step}")

  def _with_retries(self, fn):
    """fn() with retries: damage raises at once, other errors stop the run."""
    for attempt in range(_RESTORE_ATTEMPTS):
      try:
        return fn()
      except Exception as e:  # pylint: disable=broad-except
        if checkpoint_facts.is_damage(e):
          raise DamagedCheckpointError(checkpoint_facts.describe(e)) from e
        if attempt + 1 == _RESTORE_ATTEMPTS:
          raise StorageError(
              f"Cannot read checkpoints in {self.directory} after "
              f"{_RESTORE_ATTEMPTS} attempts ({type(e).__name__}: "
              f"{checkpoint_facts.describe(e)}); nothing was moved. Check the "
              "storage and run the same command again.") from e
        logging.warning("Reading a checkpoint failed (%s); retrying.",
                        checkpoint_facts.describe(e))
        time.sleep(_RETRY_SECONDS * (attempt + 1))
    raise AssertionError("unreachable")

  def quarantine(self, step: int, why: str) -> str:
    """Moves checkpoint `step` to WORKDIR/checkpoints_damaged/ (process 0).

    Returns:
      Where it went.
    """
    dst = self.move_aside(step, "checkpoints_damaged")
    logging.warning("Checkpoint %d is damaged (%s); moved it to %s.", step,
                    why, dst)
    return dst

  def move_aside(self, step: int, folder: str) -> str:
    """Moves checkpoint `step` to WORKDIR/<folder>/<step>-<time> (kept whole).

    Returns:
      Where it went.
    """
    src = self.directory / str(step)
    dst = self.directory.parent / folder / f"{step}-{int(time.time())}"
    if jax.process_index() == 0 and src.exists():
      dst.parent.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"move_{folder}_{step}")
    self._manager.reload()
    return str(dst)


def _handlers() -> dict:
  """The handlers of a checkpoint's items (Orbax reads metadata with them)."""
  return dict(state=ocp.StandardCheckpointHandler(),
              config=ocp.JsonCheckpointHandler(),
              checksums=ocp.JsonCheckpointHandler())


def first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def _place(x, abstract):
  """`x` with the sharding of `abstract`, moving it only where needed."""
  sharding = getattr(abstract, "sharding", None)
  if sharding is None:
    return x
  if isinstance(x, jax.Array):
    if (not x.is_fully_addressable or
        x.sharding.is_equivalent_to(sharding, x.ndim)):
      return x
  return jax.device_put(x, sharding)


def shared_decision(value: int) -> int:
  """Process 0's `value` on every process (once per run, at start-up)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (same answer everywhere)."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
