"""Orbax checkpoints of the train state, and loading the pretrained encoder.

Layout: WORKDIR/checkpoints/<step>/{state, config}. `state` is the whole
`TrainState` pytree; `config` is the run's resolved config as JSON, so a
checkpoint is self-contained: `load_encoder(path)` needs nothing else.

Saves are asynchronous (training goes on while the files are written), keep
the last K, and a damaged newest checkpoint is moved aside to
WORKDIR/checkpoints_damaged/ (never deleted) and the previous one restored.
"""
import copy
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from byol_jax import config_lib
from byol_jax.errors import ConfigError

_ITEMS = ("state", "config")


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
  _fill_missing(d, config_to_json(config_lib.base_config()))
  config = ml_collections.ConfigDict(d)
  for key in ("crop_scale", "crop_ratio"):
    if key in config.data:
      config.data[key] = tuple(config.data[key])
  return config


class Checkpointer:
  """Periodic asynchronous saves, keep-last-K, resume with fallback.

  Every process must create it and call `save`/`restore` (Orbax coordinates
  the writes of a multi-host run).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    """Opens (or creates) WORKDIR/checkpoints.

    Args:
      workdir: the run's directory (local path or a bucket).
      config: reads keep_checkpoints, checkpoint_every_steps,
        checkpoint_every_minutes; saved beside every state.
    """
    self.directory = as_path(workdir) / "checkpoints"
    self._config_json = config_to_json(config)
    self._every_steps = config.checkpoint_every_steps
    self._every_seconds = 60.0 * config.checkpoint_every_minutes
    self._last_save_time = time.monotonic()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=True,
            enable_async_checkpointing=True),
        item_names=_ITEMS)

  # ------------------------------------------------------------ saving ----
  def due(self, step: int) -> bool:
    """Whether a periodic save is due after `step` (same on every process)."""
    if self._every_steps and step % self._every_steps == 0:
      return True
    if self._every_seconds:
      late = time.monotonic() - self._last_save_time >= self._every_seconds
      if jax.process_count() > 1:  # Clocks differ: process 0 decides.
        late = bool(multihost_utils.broadcast_one_to_all(np.asarray(late)))
      return late
    return False

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of `state` at `step` (no-op if it exists)."""
    if step in self._manager.all_steps():
      return
    if jax.process_count() == 1:
      # One blocking copy to host, then Orbax writes NumPy in the background.
      # Device arrays cost far more on their first save (13 s vs 0.5 s for
      # the tiny model on 8 CPU devices); a multi-host state is not fully
      # addressable from one process and is saved as it is.
      state = jax.device_get(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(self._config_json)), force=True)
    self._last_save_time = time.monotonic()

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # --------------------------------------------------------- restoring ----
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state: Any) -> Any | None:
    """The newest readable state, or None when there is no checkpoint.

    A checkpoint that fails to restore is moved to checkpoints_damaged/ with
    a warning and the next older one is tried, so no good checkpoint is
    lost and the next save of that step does not collide with it.

    Args:
      abstract_state: ShapeDtypeStructs (with shardings) of the state.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint at step %d is damaged (%s: %s); falling "
                        "back to an older one.", step, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
        self._quarantine(step)
        continue
      # States saved from host copies come back on one device: place them
      # as the abstract state says (replicated over the mesh).
      return jax.tree.map(_place, restored, abstract_state)
    return None

  def _quarantine(self, step: int) -> None:
    src = self.directory / str(step)
    dst_dir = self.directory.parent / "checkpoints_damaged"
    if jax.process_index() == 0 and src.exists():
      dst_dir.mkdir(parents=True, exist_ok=True)
      dst = dst_dir / f"{step}-{int(time.time())}"
      src.rename(dst)
      logging.warning("Moved the damaged checkpoint to %s.", dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine_{step}")
    self._manager.reload()


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


# ----------------------------------------------------------- loading ------
def _find_checkpoint_dir(path: str) -> tuple[epath.Path, int | None]:
  """Resolves a workdir, its checkpoints/ dir or a step dir to (dir, step)."""
  path = as_path(path)
  if not path.exists():
    raise ConfigError(f"No checkpoint at {path}: the path does not exist; "
                      "pass a workdir of byol_jax.train or its checkpoints/ "
                      "directory.")
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  if path.name.isdigit() and (path / "state").is_dir():
    return path.parent, int(path.name)
  return path, None


def load_run(path: str, step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """Restores a run's config and raw state (nested dicts of numpy arrays).

  Args:
    path: a workdir, its checkpoints/ directory or one step's directory.
    step: which step (default: the newest, or the one `path` names).

  Returns:
    (config, state as nested dicts, step).
  """
  directory, named_step = _find_checkpoint_dir(path)
  step = step if step is not None else named_step
  manager = ocp.CheckpointManager(directory, item_names=_ITEMS)
  steps = manager.all_steps()
  if not steps:
    raise ConfigError(f"No checkpoint in {directory}; train first with "
                      "`python -m byol_jax.train --workdir=...`.")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ConfigError(f"No checkpoint of step {step} in {directory}; "
                      f"available steps: {sorted(steps)}.")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  manager.close()
  # Host numpy arrays: the caller places them where it needs them.
  state = jax.tree.map(np.asarray, restored.state)
  return config_from_json(restored.config), state, step


def load_encoder(path: str, step: int | None = None
                 ) -> tuple[nn.Module, dict[str, Any]]:
  """The pretrained online encoder of a checkpoint, for downstream code.

      encoder, variables = byol_jax.load_encoder("/tmp/run")
      features = encoder.apply(variables, images, train=False)  # [B, D]

  `images` are float [B, H, W, 3], normalised with the ImageNet mean and std
  (`byol_jax.data.augment.normalize` of values in [0, 1]).

  Args:
    path: a workdir, its checkpoints/ directory or one step's directory.
    step: which step (default: the newest).

  Returns:
    (the ResNet module, {'params': ..., 'batch_stats': ...} of the encoder).
  """
  from byol_jax.methods import network  # pylint: disable=g-import-not-at-top
  config, state, _ = load_run(path, step)
  encoder = network.make_encoder(config)
  variables = {"params": state["params"]["encoder"],
               "batch_stats": state["batch_stats"]["encoder"]}
  return encoder, jax.tree.map(jax.numpy.asarray, variables)
