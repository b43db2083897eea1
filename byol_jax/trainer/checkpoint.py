"""Orbax checkpoints of the train state: when to save, saving, restoring.

WORKDIR/checkpoints/<step>/{state, config, checksums}: the `TrainState`, the
resolved config as JSON (all `load_encoder` needs) and per-leaf checksums,
verified after every restore. Orbax decides when to save (steps, minutes,
preemption) and saves asynchronously and atomically; its metadata gives the
saved layout, checked before reading. Only damage (`checkpoint_facts`) moves
a checkpoint aside; other read errors are retried, then stop the run.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import time
import types
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from byol_jax.errors import StorageError
from byol_jax.trainer import checkpoint_facts
from byol_jax.trainer import checksums
from byol_jax.trainer import config_lib

ITEMS = ("state", "config", "checksums")
_RESTORE_ATTEMPTS = 3
_RETRY_SECONDS = 2.0
DamagedCheckpointError = checkpoint_facts.DamagedCheckpointError


def as_path(path: str | os.PathLike) -> epath.Path:
  """A local path made absolute, or a bucket path (gs://...) as it is."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def write_config(workdir: epath.Path,
                 config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json: the resolved config of the latest start."""
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(
        config_lib.config_to_json(config), indent=2, sort_keys=True))


@dataclasses.dataclass
class _Minutes(policies.ContinuousCheckpointingPolicy):
  """Orbax's minimum-interval policy, asked only at log steps (on several
  processes it is a host round trip); time counts from its creation until
  the first checkpoint."""
  every: int = 1
  start: Any = dataclasses.field(default_factory=lambda: types.SimpleNamespace(
      time=datetime.datetime.now(datetime.timezone.utc)))

  def should_save(self, step, previous_steps, *, context) -> bool:
    return not step.step % self.every and super().should_save(
        step, list(previous_steps) or [self.start], context=context)


@dataclasses.dataclass
class _Preemption(policies.SaveDecisionPolicy):
  """Saves at SIGTERM (one process: `requested()`) or at JAX's preemption
  sync point (several; Orbax passes it in `context`), and remembers it."""
  requested: Callable[[], bool]
  reached: bool = False

  def should_save(self, step, previous_steps, *, context) -> bool:
    self.reached = self.reached or context.reached_preemption or (
        self.requested() and jax.process_count() == 1)
    return self.reached


class Checkpointer:
  """Decides, saves and restores the train state of one run (every process
  creates it and calls the same methods in the same order)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               read_only: bool = False,
               stop_requested: Callable[[], bool] = lambda: False):
    """Opens (or creates) WORKDIR/checkpoints (local or a bucket); `config`
    gives the cadences and is saved with each state; `stop_requested`
    (SIGTERM, as `preempt.Guard.requested` says) saves at the next step."""
    self.directory = as_path(workdir) / "checkpoints"
    self._config_json = config_lib.config_to_json(config)
    self._preemption = _Preemption(stop_requested)
    rules = [self._preemption]
    if config.checkpoint_every_steps > 0:
      rules.append(policies.FixedIntervalPolicy(
          int(config.checkpoint_every_steps)))
    if config.checkpoint_every_minutes > 0:
      rules.append(_Minutes(
          minimum_interval_secs=int(60 * config.checkpoint_every_minutes),
          every=max(int(config.log_every_steps), 1)))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=not read_only,
            read_only=read_only, enable_async_checkpointing=True,
            save_decision_policy=policies.AnySavePolicy(rules)),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           config=ocp.JsonCheckpointHandler(),
                           checksums=ocp.JsonCheckpointHandler()))
    self._said = set(self._manager.all_steps())

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    try:
      with self._saving():
        self.close()
    except StorageError as e:
      if exc_type is None:
        raise
      logging.warning("Finishing the last checkpoint failed too: %s", e)

  @property
  def preempted(self) -> bool:
    """Whether the last `should_save` decided to save because of preemption."""
    return self._preemption.reached

  # -------------------------------------------------------------- saving ----
  def should_save(self, step: int) -> bool:
    """Whether to save after `step`: host-only, the same on every process."""
    return self._manager.should_save(step)

  @contextlib.contextmanager
  def _saving(self):
    """A failed save, also one that failed in the background: StorageError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      raise StorageError(
          f"Saving a checkpoint to {self.directory} failed "
          f"({checkpoint_facts.describe(e)}); check that the workdir is "
          "writable and has space, then run the same command again to resume "
          "from the last checkpoint.") from e

  def wait(self) -> None:
    """Blocks until every started save is on disk (raises StorageError)."""
    with self._saving():
      self._manager.wait_until_finished()
      self._manager.check_for_errors()

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of `state` at `step` (no-op if it exists);
    StorageError if the previous save failed or this one cannot start."""
    # The previous save had a whole interval to finish: waiting costs
    # nothing, and its failure surfaces here, at once.
    self.wait()
    if step in self._manager.all_steps():
      return
    sums = checksums.compute(state)
    if jax.process_count() == 1:
      # One blocking copy to host, then Orbax writes NumPy in the background
      # (device arrays cost far more on their first save). A multi-host
      # state is not fully addressable and is saved as it is.
      state = jax.device_get(state)
    with self._saving():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          config=ocp.args.JsonSave(self._config_json),
          checksums=ocp.args.JsonSave(sums)), force=True)

  def say_committed(self, say) -> None:
    """Says 'step N: checkpoint -> DIR/N' once for each save that committed
    (none while one is in flight; raises StorageError if one failed)."""
    with self._saving():
      self._manager.check_for_errors()
    if self._manager.is_saving_in_progress():
      return
    for step in sorted(set(self._manager.all_steps()) - self._said):
      # Orbax writes commit_success.txt last, under the final name (its list
      # also holds saves that failed).
      if (self.directory / str(step) / "commit_success.txt").exists():
        self._said.add(step)
        say(f"step {step}: checkpoint -> {self.directory}/{step}")

  def close(self) -> None:
    """Finishes the save in flight (so no partial step is left) and closes."""
    try:
      self._manager.wait_until_finished()  # Its error is raised once.
    finally:
      self._manager.close()

  # ----------------------------------------------------------- restoring ----
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def saved_config(self, step: int) -> ml_collections.ConfigDict:
    """The config saved with checkpoint `step`."""
    restored = self._with_retries(lambda: self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())))
    return config_lib.config_from_json(restored.config)

  def restore(self, abstract_state: Any, step: int) -> Any:
    """Checkpoint `step`, placed as `abstract_state`'s shardings say.

    Raises:
      LayoutError: the saved tree, shapes or dtypes differ (nothing moved).
      DamagedCheckpointError: unreadable or inconsistent files, or contents
        whose checksum does not match the one written at save time.
      StorageError: the storage kept failing (nothing was moved).
    """
    checkpoint_facts.check_layout(
        self._with_retries(lambda: self._manager.item_metadata(step).state),
        abstract_state, f"{self.directory}/{step}")
    restored = self._with_retries(lambda: self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            checksums=ocp.args.JsonRestore())))
    state, expected = restored.state, restored.checksums
    if expected is not None:
      got = checksums.compute(state)
      bad = sorted(k for k in expected if got.get(k) != expected[k])
      if bad or got.keys() != expected.keys():
        raise DamagedCheckpointError(
            f"checkpoint {step}: contents do not match the checksums written "
            f"at save time ({len(bad)} leaves differ, e.g. {bad[:2]})")
    return state

  def _with_retries(self, fn):
    """fn() with retries: damage raises at once, other errors stop the run."""
    for attempt in range(_RESTORE_ATTEMPTS):
      try:
        return fn()
      except Exception as e:  # pylint: disable=broad-except
        why = checkpoint_facts.describe(e)
        if checkpoint_facts.is_damage(e):
          raise DamagedCheckpointError(why) from e
        if attempt + 1 == _RESTORE_ATTEMPTS:
          raise StorageError(
              f"Cannot read checkpoints in {self.directory} after "
              f"{_RESTORE_ATTEMPTS} attempts ({type(e).__name__}: {why}); "
              "nothing was moved. Check the storage and run the same command "
              "again.") from e
        logging.warning("Reading a checkpoint failed (%s); retrying.", why)
        time.sleep(_RETRY_SECONDS * (attempt + 1))

  def move_aside(self, steps: list[int], folder: str) -> str:
    """Moves checkpoints `steps`, whole, to WORKDIR/<folder>/<step>-<time>
    (process 0 moves them); returns WORKDIR/<folder>/."""
    for step in steps:
      src = self.directory / str(step)
      dst = self.directory.parent / folder / f"{step}-{int(time.time())}"
      if jax.process_index() == 0 and src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"move_{folder}_{step}")
    self._manager.reload()
    return f"{self.directory.parent}/{folder}/"

