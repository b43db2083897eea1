"""Official BYOL checkpoints (DeepMind's Haiku pickles) as byol_jax workdirs.

An official pretraining checkpoint (`pretrain_res50x1.pkl`, ...) holds
`dict(experiment_state=_ByolExperimentState(online_params, target_params,
online_state, target_state, opt_state), step, rng)`: Haiku trees
{module: {leaf: array}}, batch-norm averages (`.../~/mean_ema`, `var_ema`,
field `average`) and the LARS momentum (`opt_state[1].mu`).

Haiku's ResNet v1 has byol_jax's layout with TF 'SAME' padding, so it maps
name by name (the tables below) onto `models.ResNet(padding='same')`. Kernels
are HWIO / [in, out] in both; batch-norm vectors lose Haiku's 1-axes.
"""
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from byol_jax.core import methods
from byol_jax.core import models
from byol_jax.core import optim
from byol_jax.core import sharding
from byol_jax.core import train_state
from byol_jax.errors import ConfigError
from byol_jax.interop import safe_pickle
from byol_jax.trainer import checkpoint
from byol_jax.trainer import config_lib

_STATE_FIELDS = ("online_params", "target_params", "online_state",
                 "target_state", "opt_state")
_BLOCK = re.compile(r"block_group_(\d+)/~/block_(\d+)/~/(\w+)")
_STEM = {"initial_conv": "stem_conv", "initial_batchnorm": "stem_bn"}
_ENCODER_LAYERS = {
    "conv_0": "conv1", "conv_1": "conv2", "conv_2": "conv3",
    "batchnorm_0": "bn1", "batchnorm_1": "bn2", "batchnorm_2": "bn3",
    "shortcut_conv": "downsample_conv", "shortcut_batchnorm": "downsample_bn",
}
_HEADS = ("projector", "predictor")
_HEAD_LAYERS = {"linear": "dense1", "batch_norm": "bn1", "linear_1": "dense2"}
_LEAVES = {"w": "kernel", "b": "bias", "scale": "scale", "offset": "bias"}
_STATS = {"mean_ema": "mean", "var_ema": "var"}
_PARTS = ("encoder", "projector", "predictor", "classifier")
WHICH = ("online", "target")


def read_official(path: str) -> dict[str, Any]:
  """{'online_params', ..., 'opt_state', 'step'} of an official checkpoint.

  Read with `safe_pickle`; raises ConfigError for any other file.
  """
  obj = safe_pickle.load(path)
  state = obj.get("experiment_state") if isinstance(obj, dict) else None
  if state is None:
    found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ConfigError(
        f"{path} is not an official BYOL checkpoint: expected a dict with "
        f"experiment_state, step and rng, found {found}.")
  fields = getattr(state, "_fields", ())
  if not all(f in fields for f in _STATE_FIELDS):
    raise ConfigError(
        f"{path} is not a BYOL pretraining checkpoint: its experiment_state "
        f"is {type(state).__name__} with fields {list(fields)}, not "
        f"{list(_STATE_FIELDS)}; convert the pretrain_*.pkl checkpoint.")
  out = {f: getattr(state, f) for f in _STATE_FIELDS}
  out["step"] = int(obj.get("step", 0))
  return out


def encoder_prefix(params: dict) -> str:
  """The encoder's Haiku module name, e.g. 'res_net50' or 'res_net200'."""
  prefixes = sorted(k[:-len("/~/initial_conv")] for k in params
                    if k.endswith("/~/initial_conv"))
  if len(prefixes) != 1:
    raise ConfigError(
        "The checkpoint has no single ResNet encoder (modules ending in "
        f"/~/initial_conv: {prefixes}).")
  return prefixes[0]


def architecture(params: dict, prefix: str) -> dict[str, int]:
  """Depth, width and stem channels of the Haiku ResNet in `params`."""
  blocks: dict[int, int] = {}
  bottleneck = False
  for module in params:
    m = _BLOCK.fullmatch(module[len(prefix) + 3:])
    if module.startswith(prefix + "/~/") and m:
      group, block = int(m[1]), int(m[2])
      blocks[group] = max(blocks.get(group, 0), block + 1)
      bottleneck |= m[3] == "conv_2"
  stage_sizes = tuple(blocks.get(g, 0) for g in range(len(blocks)))
  if not bottleneck:
    raise ConfigError(
        f"{prefix} has basic blocks; only bottleneck ResNets (50, 101, 152, "
        "200) convert: the official code's basic-block ResNets have a "
        "projection shortcut on the first block, which byol_jax does not.")
  depth = models.depth_of(stage_sizes, bottleneck)
  if depth is None:
    raise ConfigError(f"{prefix} has {stage_sizes} blocks per group, which is "
                      "no ResNet depth byol_jax builds (50, 101, 152, 200).")
  stem = int(params[prefix + "/~/initial_conv"]["w"].shape[-1])
  width, num_filters = (stem // 64, 64) if stem % 64 == 0 else (1, stem)
  return dict(depth=depth, width=width, num_filters=num_filters)


def _module_path(module: str, prefix: str) -> tuple[str, ...]:
  """The byol_jax path of a Haiku module, e.g. ('encoder', 'stem_conv')."""
  if module.startswith(prefix + "/~/"):
    rest = module[len(prefix) + 3:]
    if rest in _STEM:
      return ("encoder", _STEM[rest])
    m = _BLOCK.fullmatch(rest)
    if m and m[3] in _ENCODER_LAYERS:
      return ("encoder", f"stage{int(m[1]) + 1}_block{int(m[2]) + 1}",
              _ENCODER_LAYERS[m[3]])
  # The official MLP creates its layers in __call__ (Haiku names them
  # 'projector/linear'); '~/' would mark layers created in __init__.
  head, _, layer = module.partition("/")
  layer = layer.removeprefix("~/")
  if head in _HEADS and layer in _HEAD_LAYERS:
    return (head, _HEAD_LAYERS[layer])
  if module == "classifier":
    return ("classifier",)
  raise ConfigError(f"The checkpoint has a module {module!r} that byol_jax's "
                    "BYOL network has no place for.")


def convert_tree(params: dict, state: dict,
                 prefix: str) -> tuple[dict, dict]:
  """Haiku params (or LARS momentum) and state -> (params, batch_stats).

  `params` is {module: {'w'|'b'|'scale'|'offset': array}}, `state`
  {module/~/mean_ema|var_ema: {'average': ...}} or {}; the results are nested
  dicts of float32 NumPy arrays under 'encoder', 'projector', ... (present).
  """
  out_params, out_stats = {}, {}  # {path tuple: array}
  for module, leaves in params.items():
    path = _module_path(module, prefix)
    for leaf, value in leaves.items():
      if leaf not in _LEAVES:
        raise ConfigError(f"Unknown parameter {module}/{leaf} in the "
                          "checkpoint.")
      value = np.asarray(value, np.float32)
      if leaf in ("scale", "offset"):  # [1, 1, 1, C] or [1, C] -> [C]
        value = value.reshape(-1)
      out_params[path + (_LEAVES[leaf],)] = value
  for name, ema in state.items():
    module, _, kind = name.rpartition("/~/")
    if kind not in _STATS or "average" not in ema:
      raise ConfigError(f"Unknown state {name} in the checkpoint.")
    out_stats[_module_path(module, prefix) + (_STATS[kind],)] = np.asarray(
        ema["average"], np.float32).reshape(-1)
  return (traverse_util.unflatten_dict(out_params),
          traverse_util.unflatten_dict(out_stats))


def make_config(arch: dict[str, int], params: dict,
                base: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """`base` (default `config_lib.base_config()`) with the checkpoint's network.

  Haiku's batch norm: decay 0.9, epsilon 1e-5.
  """
  config = (base or config_lib.base_config()).copy_and_resolve_references()
  if config.method != "byol":
    raise ConfigError(f"The official checkpoints are BYOL; the config's "
                      f"method is {config.method!r}. Use a BYOL config.")
  with config.unlocked():
    config.model.update(dict(stem="imagenet", padding="same",
                             bn_momentum=0.9, bn_epsilon=1e-5, **arch))
    for head in _HEADS:
      hidden = params[head]["dense1"]["kernel"].shape[1]
      output = params[head]["dense2"]["kernel"].shape[1]
      config[head].update(dict(num_layers=2, hidden_dim=int(hidden),
                               output_dim=int(output)))
    config.data.num_classes = int(params["classifier"]["kernel"].shape[1])
  return config


def _check_like(abstract: Any, tree: Any) -> None:
  """Raises ConfigError unless `tree` has the paths and shapes of `abstract`."""
  want, have = ({jax.tree_util.keystr(p): np.shape(x) for p, x in
                 jax.tree_util.tree_flatten_with_path(t)[0]}
                for t in (abstract, tree))
  problems = [f"{k} is {have.get(k, 'missing')}, not {want.get(k, 'absent')}"
              for k in sorted(want.keys() | have.keys())
              if want.get(k) != have.get(k)]
  if problems:
    raise ConfigError(f"The converted state does not fit byol_jax's network "
                      f"({len(problems)} problems, e.g. {problems[0]}).")


def _optimizer_state(tx, params: dict, momentum: dict | None, step: int,
                     own_classifier: bool = False):
  """tx.init(params) with the LARS trace from `momentum` and counts at step.

  Both LARS accumulate the trust-scaled update before the learning rate.
  With `own_classifier` (optimizer.classifier='sgd') the classifier's
  momentum is not carried over: that SGD's trace means something else.
  """
  flat = {k: v for k, v in traverse_util.flatten_dict(momentum or {}).items()
          if not (own_classifier and k[0] == "classifier")}
  placed = []

  def fill(path, leaf):
    names = [getattr(k, "name", None) for k in path]
    if names[-1] == "count":  # Schedules resume where the run stopped.
      return jnp.full_like(leaf, step)
    if "trace" in names and all(getattr(k, "key", None) != "classifier"
                                for k in path[:names.index("trace")]):
      key = tuple(k.key for k in path[names.index("trace") + 1:])
      if key in flat:
        placed.append(key)
        return jnp.asarray(flat[key], leaf.dtype)
    return leaf

  opt_state = jax.tree_util.tree_map_with_path(fill, tx.init(params))
  if len(placed) != len(flat):
    raise ConfigError(f"Only {len(placed)} of {len(flat)} LARS momentum "
                      "tensors found a place in byol_jax's optimizer state.")
  return opt_state


def write_workdir(workdir: str, config: ml_collections.ConfigDict, step: int,
                  params: dict, batch_stats: dict, target: dict,
                  momentum: dict | None) -> None:
  """Writes config.json and checkpoints/<step> as `train` restores them."""
  method = methods.get(config.method)
  model = method.make_network(config)
  # The optimizer state's structure does not depend on the schedule length.
  tx, _ = optim.build_optimizer(config, max(step, 1), 1)
  mesh = sharding.make_mesh()
  abstract = train_state.abstract(config, model, tx, mesh, method.HAS_TARGET)
  state = train_state.TrainState(
      step=np.asarray(step, np.int32), params=params, batch_stats=batch_stats,
      target=target, opt_state=_optimizer_state(
          tx, params, momentum, step,
          config.optimizer.get("classifier", "main") == "sgd"))
  _check_like(abstract, state)
  ckpt = checkpoint.Checkpointer(workdir, config)
  ckpt.save(step, state)
  ckpt.close()
  checkpoint.write_config(checkpoint.as_path(workdir), config)


def from_official(checkpoint_path: str, workdir: str, which: str = "online",
                  config: ml_collections.ConfigDict | None = None
                  ) -> dict[str, Any]:
  """Converts an official BYOL pretraining checkpoint into a byol_jax workdir.

  Args:
    checkpoint_path: the official .pkl file.
    workdir: an empty or new directory.
    which: 'online' (with its LARS momentum, so that `train` continues the
      run) or 'target' (the EMA network in the online slot, fresh momentum).
      The target slot always holds the official target network.
    config: the BYOL config to store (default `config_lib.base_config()`),
      network fields set from the checkpoint.

  Returns:
    A summary: step, depth, width, which, momentum (bool), workdir.
  """
  if which not in WHICH:
    raise ConfigError(f"--which={which!r}; use one of {list(WHICH)}.")
  if checkpoint.as_path(workdir).joinpath("checkpoints").exists():
    raise ConfigError(f"{workdir} already has checkpoints; convert into a "
                      "new --workdir.")
  official = read_official(checkpoint_path)
  haiku = official[f"{which}_params"]
  prefix = encoder_prefix(haiku)
  arch = architecture(haiku, prefix)
  params, stats = convert_tree(haiku, official[f"{which}_state"], prefix)
  missing = [p for p in _PARTS if p not in params]
  if missing:
    raise ConfigError(f"{checkpoint_path} has no {', '.join(missing)} "
                      "parameters; a BYOL pretraining checkpoint has all of "
                      f"{list(_PARTS)}.")
  tparams, tstats = convert_tree(official["target_params"],
                                 official["target_state"], prefix)
  target = {"params": {k: tparams[k] for k in ("encoder", "projector")},
            "batch_stats": {k: tstats[k] for k in ("encoder", "projector")}}
  mu = None  # The official LARS state's `mu` tree (Haiku layout).
  if which == "online" and isinstance(official["opt_state"], (tuple, list)):
    mu = next((s.mu for s in official["opt_state"]
               if isinstance(getattr(s, "mu", None), dict)), None)
  momentum = None if mu is None else convert_tree(mu, {}, prefix)[0]
  config = make_config(arch, params, config)
  step = official["step"]
  write_workdir(workdir, config, step, params, stats, target, momentum)
  logging.info("Converted %s (%s network, step %d) into %s.",
               checkpoint_path, which, step, workdir)
  return dict(step=step, which=which, momentum=momentum is not None,
              workdir=str(workdir), **arch)
