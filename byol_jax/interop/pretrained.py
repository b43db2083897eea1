"""Pretrained networks out of byol_jax checkpoints, on any device layout.

    encoder, variables = byol_jax.load_encoder("/tmp/run")
    config, state, step = byol_jax.interop.pretrained.load_run("/tmp/run")
"""
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from byol_jax import storage
from byol_jax.core.methods import network
from byol_jax.errors import ConfigError
from byol_jax.trainer.checkpoint import as_path
from byol_jax.trainer.config_lib import config_from_json


def _step_of(name: str) -> int | None:
  """'16' -> 16; also '16-1700000000' (a moved-aside checkpoint)."""
  head = name.split("-")[0]
  return int(head) if head.isdigit() else None


def find_checkpoint(path: str, step: int | None = None
                    ) -> tuple[epath.Path, int]:
  """(the step directory, its step) that `path` and `step` name.

  `path` is a workdir, a folder of checkpoints (also checkpoints_superseded/
  or checkpoints_damaged/) or one checkpoint's directory.
  """
  storage.check(path)  # gs:// without its client: one line.
  path = as_path(path)
  if not path.exists():
    raise ConfigError(f"No checkpoint at {path}: the path does not exist; "
                      "pass a workdir of byol_jax.train, a checkpoints "
                      "folder or one checkpoint's directory.")
  if (path / "state").is_dir():
    named = _step_of(path.name)
    if step is not None and named is not None and step != named:
      raise ConfigError(f"{path} is the checkpoint of step {named}, not "
                        f"{step}; pass its folder to choose a step.")
    return path, (named if named is not None else -1)
  folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = {}  # The newest directory where one step appears twice.
  for child in sorted(folder.iterdir() if folder.is_dir() else (),
                      key=lambda p: p.name):
    if _step_of(child.name) is not None and (child / "state").is_dir():
      steps[_step_of(child.name)] = child
  if not steps:
    raise ConfigError(f"No checkpoint in {folder}; train first with "
                      "`python -m byol_jax.train --workdir=...`.")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ConfigError(f"No checkpoint of step {step} in {folder}; "
                      f"available steps: {sorted(steps)}.")
  return steps[step], step


def load_run(path: str, step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, state as nested dicts of NumPy arrays, step) of a checkpoint.

  Whatever processes and device layout wrote it, arrays are read whole.
  `path` is what `find_checkpoint` takes; `step` defaults to the newest (or
  the one `path` names).
  """
  directory, step = find_checkpoint(path, step)
  # A target on this process's first device: Orbax then ignores the
  # sharding of the run that saved it (any number of processes/devices).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as reader:
    metadata = reader.metadata(directory / "state").item_metadata
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        metadata, is_leaf=lambda m: hasattr(m, "shape"))
    restored = reader.restore(directory / "state", target)
  config = json.loads((directory / "config" / "metadata").read_text())
  state = jax.tree.map(np.asarray, restored)
  if step < 0:
    step = int(state.get("step", -1))
  return config_from_json(config), state, step


def load_encoder(path: str, step: int | None = None, *, which: str = "online"
                 ) -> tuple[nn.Module, dict[str, Any]]:
  """The pretrained encoder of a checkpoint, for downstream code.

      encoder, variables = byol_jax.load_encoder("/tmp/run")
      features = encoder.apply(variables, images, train=False)  # [B, D]

  `images` are float [B, H, W, 3] in [0, 1] normalised with the ImageNet
  mean and std (`byol_jax.data.augment.normalize`). `path` and `step` are
  those of `load_run`; `which` is 'online' or 'target' (BYOL's EMA network).
  The variables are on the default device.
  """
  config, state, _ = load_run(path, step)
  return network.make_encoder(config), jax.tree.map(
      jnp.asarray, encoder_variables(state, which, path))


def encoder_variables(state: dict, which: str, where: str = "") -> dict:
  """{'params', 'batch_stats'} of the online or target encoder of a state."""
  if which not in ("online", "target"):
    raise ConfigError(f"which={which!r}: use 'online' or 'target'.")
  tree = state if which == "online" else state.get("target") or {}
  if which == "target" and not tree:
    raise ConfigError(f"The checkpoint {where} has no target network (only "
                      "BYOL has one); use --which=online.")
  params = tree.get("params", {})
  if "encoder" not in params:
    raise ConfigError(f"The checkpoint {where} has no {which} encoder "
                      f"parameters (found {sorted(params)}).")
  return {"params": params["encoder"],
          "batch_stats": tree.get("batch_stats", {}).get("encoder", {})}
