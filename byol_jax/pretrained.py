"""Pretrained networks out of byol_jax checkpoints, on any device layout.

    encoder, variables = byol_jax.load_encoder("/tmp/run")
    config, state, step = byol_jax.pretrained.load_run("/tmp/run")
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from byol_jax import storage
from byol_jax.checkpoint import as_path, config_from_json
from byol_jax.errors import ConfigError
from byol_jax.methods import network


def _find_checkpoint_dir(path: str) -> tuple[epath.Path, int | None]:
  """Resolves a workdir, its checkpoints/ dir or a step dir to (dir, step)."""
  storage.check(path)  # gs:// without its client: one line.
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
  """Restores a run's config and raw state as host NumPy arrays.

  Works whatever wrote the checkpoint (one or many processes, any device
  layout): every array is read whole into host memory, and the caller places
  it where it needs it.

  Args:
    path: a workdir, its checkpoints/ directory or one step's directory.
    step: which step (default: the newest, or the one `path` names).

  Returns:
    (config, state as nested dicts of numpy arrays, step).
  """
  directory, named_step = _find_checkpoint_dir(path)
  step = step if step is not None else named_step
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          create=False, save_root_metadata=False),
      item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                         config=ocp.JsonCheckpointHandler(),
                         checksums=ocp.JsonCheckpointHandler()))
  try:
    steps = manager.all_steps()
    if not steps:
      raise ConfigError(f"No checkpoint in {directory}; train first with "
                        "`python -m byol_jax.train --workdir=...`.")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ConfigError(f"No checkpoint of step {step} in {directory}; "
                        f"available steps: {sorted(steps)}.")
    # A target on this process's first device: Orbax then ignores the
    # sharding of the run that saved it (any number of processes/devices).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step).state
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        metadata, is_leaf=lambda m: hasattr(m, "shape"))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        config=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = jax.tree.map(np.asarray, restored.state)
  return config_from_json(restored.config), state, step


def load_encoder(path: str, step: int | None = None, *, which: str = "online"
                 ) -> tuple[nn.Module, dict[str, Any]]:
  """The pretrained encoder of a checkpoint, for downstream code.

      encoder, variables = byol_jax.load_encoder("/tmp/run")
      features = encoder.apply(variables, images, train=False)  # [B, D]

  `images` are float [B, H, W, 3], normalised with the ImageNet mean and std
  (`byol_jax.data.augment.normalize` of values in [0, 1]).

  Args:
    path: a workdir, its checkpoints/ directory or one step's directory.
    step: which step (default: the newest).
    which: 'online' or 'target' (BYOL's EMA network).

  Returns:
    (the ResNet module, {'params': ..., 'batch_stats': ...} of the encoder,
    on the default device).
  """
  config, state, _ = load_run(path, step)
  return network.make_encoder(config), jax.tree.map(
      jnp.asarray, encoder_variables(state, which, path))


def encoder_variables(state: dict, which: str, where: str = "") -> dict:
  """{'params', 'batch_stats'} of the online or target encoder of a state."""
  if which == "target":
    tree = state.get("target") or {}
    if not tree:
      raise ConfigError(f"The checkpoint {where} has no target network (only "
                        "BYOL has one); use --which=online.")
  elif which == "online":
    tree = state
  else:
    raise ConfigError(f"which={which!r}: use 'online' or 'target'.")
  params = tree.get("params", {})
  if "encoder" not in params:
    raise ConfigError(f"The checkpoint {where} has no {which} encoder "
                      f"parameters (found {sorted(params)}).")
  return {"params": params["encoder"],
          "batch_stats": tree.get("batch_stats", {}).get("encoder", {})}
