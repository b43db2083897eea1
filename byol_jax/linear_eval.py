r"""Linear evaluation (or fine-tuning) of a pretrained checkpoint.

  python -m byol_jax.linear_eval --workdir=/tmp/byol_cifar10 --epochs=80
  python -m byol_jax.linear_eval --workdir=/tmp/byol_cifar10 --mode=finetune
  python -m byol_jax.linear_eval --workdir=/tmp/run --checkpoint=/ckpts/run \
      --step=20000 --data_source=npz --data_path=/data/cifar10.npz

The run's config (saved in every checkpoint) names the data and the encoder;
`--data_source`/`--data_path` point the evaluation at another copy of the same
data. Top-1/top-5 are printed and written as JSON to WORKDIR/linear_eval.json
(WORKDIR/finetune.json for --mode=finetune) or --output.
"""
import json
import sys
import time
from typing import Any

import jax
from absl import app
from absl import flags
from absl import logging
from etils import epath

from byol_jax import checkpoint
from byol_jax import sharding
from byol_jax.errors import ConfigError
from byol_jax.evaluation import linear
from byol_jax.methods import network

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The pretraining run's workdir; the JSON result goes here.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A workdir, its checkpoints/ directory or one step's "
    "directory (default: --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_MODE = flags.DEFINE_enum("mode", "linear", ["linear", "finetune"],
                          "linear: frozen encoder; finetune: train it too.")
_EPOCHS = flags.DEFINE_float("epochs", 80, "Epochs over the train split.")
_STEPS = flags.DEFINE_integer("steps", 0, "If > 0, steps instead of epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
    "eval_batch_size", None, "Global eval batch (default: --batch_size).")
_BASE_LR = flags.DEFINE_float(
    "base_lr", None, "LR at batch 256 (default 0.2 linear, 0.01 finetune).")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "On kernels only.")
_SEED = flags.DEFINE_integer("seed", 0, "Head init and data order.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON result.")
_DATA_SOURCE = flags.DEFINE_string(
    "data_source", None, "Override config.data.source (tfds|folder|npz|...).")
_DATA_PATH = flags.DEFINE_string(
    "data_path", None, "Override config.data.path (image folder or .npz).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Override config.data.data_dir (TFDS).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (pods).")

DEFAULT_BASE_LR = {"linear": 0.2, "finetune": 0.01}


def _is_remote(path: str) -> bool:
  return "://" in path


def load(path: str, step: int | None):
  """(config, encoder module, encoder variables, checkpoint step)."""
  config, state, step = checkpoint.load_run(path, step)
  encoder = network.make_encoder(config)
  params = state.get("params", {})
  if "encoder" not in params:
    raise ConfigError(f"The checkpoint at {path} has no encoder parameters "
                      f"(found {sorted(params)}).")
  variables = {"params": params["encoder"],
               "batch_stats": state.get("batch_stats", {}).get("encoder", {})}
  return config, encoder, variables, step


def override_data(config, source: str | None, path: str | None,
                  data_dir: str | None):
  """Points config.data at another copy of the data; checks local paths."""
  with config.unlocked():
    if source:
      config.data.source = source
    if path:
      config.data.path = path
    if data_dir:
      config.data.data_dir = data_dir
  if config.data.source in ("npz", "folder") and config.data.path:
    p = config.data.path
    if not _is_remote(p) and not epath.Path(p).exists():
      raise ConfigError(f"The evaluation data {p} does not exist; point "
                        "--data_path at a local copy.")
  return config


def run(workdir: str, checkpoint_path: str | None = None,
        step: int | None = None, mode: str = "linear", epochs: float = 80,
        steps: int = 0, batch_size: int = 256,
        eval_batch_size: int | None = None, base_lr: float | None = None,
        weight_decay: float = 0.0, seed: int = 0, output: str | None = None,
        data_source: str | None = None, data_path: str | None = None,
        data_dir: str | None = None) -> dict[str, Any]:
  """Loads the checkpoint, runs `linear.linear_eval`, writes the JSON result.

  Returns:
    The JSON-able result (also written to `output`).
  """
  start = time.time()
  if not workdir:
    raise ConfigError("Give --workdir=DIR (the pretraining run's workdir).")
  n = jax.device_count()
  for name, value in (("batch_size", batch_size),
                      ("eval_batch_size", eval_batch_size)):
    if value is not None and (value <= 0 or value % n):
      raise ConfigError(f"--{name}={value} must be a positive multiple of "
                        f"the {n} devices.")
  if steps <= 0 and not epochs > 0:
    raise ConfigError(f"--epochs={epochs}: give a positive number of epochs "
                      "(or --steps).")
  path = checkpoint_path or workdir
  if not _is_remote(path) and not epath.Path(path).exists():
    raise ConfigError(f"No checkpoint at {path}: the directory does not "
                      "exist; pass the workdir of a byol_jax.train run or "
                      "--checkpoint=PATH.")
  config, encoder, variables, ckpt_step = load(path, step)
  config = override_data(config, data_source, data_path, data_dir)
  base_lr = DEFAULT_BASE_LR[mode] if base_lr is None else base_lr
  mesh = sharding.make_mesh()
  result = linear.linear_eval(
      config, encoder, variables, mesh, epochs=epochs, steps=steps,
      batch_size=batch_size, eval_batch_size=eval_batch_size,
      base_lr=base_lr, finetune=(mode == "finetune"),
      weight_decay=weight_decay, seed=seed)
  summary = {k: v for k, v in result.items()
             if isinstance(v, (int, float, bool, str))}
  summary.update(
      mode=mode, checkpoint=str(path), checkpoint_step=int(ckpt_step),
      method=config.method, depth=config.model.depth,
      width=config.model.width, dataset=config.data.name,
      eval_split=config.data.eval_split, device_kind=jax.devices()[0].device_kind,
      device_count=jax.device_count(), process_count=jax.process_count(),
      wall_seconds=time.time() - start)
  output = output or str(epath.Path(workdir) / (
      "finetune.json" if mode == "finetune" else "linear_eval.json"))
  if jax.process_index() == 0:
    out = epath.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  summary["output"] = output
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MULTIHOST.value:
    jax.distributed.initialize()
  try:
    s = run(_WORKDIR.value, _CHECKPOINT.value, _STEP.value, _MODE.value,
            _EPOCHS.value, _STEPS.value, _BATCH_SIZE.value,
            _EVAL_BATCH_SIZE.value, _BASE_LR.value, _WEIGHT_DECAY.value,
            _SEED.value, _OUTPUT.value, _DATA_SOURCE.value, _DATA_PATH.value,
            _DATA_DIR.value)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  logging.info("Result: %s", s)
  if jax.process_index() == 0:
    print(f"{s['mode']} eval of step {s['checkpoint_step']}: top-1 "
          f"{100 * s['top1']:.2f}% top-5 {100 * s['top5']:.2f}% "
          f"({s['epochs']:g} epochs, {s['steps']} steps, "
          f"{s['wall_seconds']:.0f} s on {s['device_count']} x "
          f"{s['device_kind']}) -> {s['output']}", flush=True)


if __name__ == "__main__":
  app.run(main)
