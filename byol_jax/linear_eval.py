r"""Linear evaluation, fine-tuning and semi-supervised fine-tuning.

  python -m byol_jax.linear_eval --workdir=/tmp/byol_cifar10 [--which=target]
  python -m byol_jax.linear_eval --workdir=/tmp/run --preset=finetune_10pct
  python -m byol_jax.linear_eval --workdir=/tmp/run --checkpoint=/ckpts/run \
      --step=20000 --data_source=npz --data_path=/data/cifar10.npz

Presets (explicit flags override them): `linear` (frozen encoder, 80
epochs, Nesterov SGD, cosine); `finetune_1pct` / `finetune_10pct`, SimCLR's
semi-supervised protocol (TFDS's `imagenet2012_subset` on ImageNet, else a
class-balanced fraction per --seed). The checkpoint's config names the data;
`--data_*` point at another copy. Results: WORKDIR/linear_eval.json
(finetune.json) or --output.
"""
import json
import time
import types
from typing import Any

import jax
from absl import flags
from etils import epath

from byol_jax import data
from byol_jax import progress
from byol_jax.core import sharding
from byol_jax.core.methods import network
from byol_jax.errors import ConfigError
from byol_jax.evaluation import linear
from byol_jax.interop import pretrained
from byol_jax.trainer import cli

PRESETS = {
    "linear": dict(mode="linear", epochs=80, batch_size=256, base_lr=0.2,
                   fraction=1.0),
    "finetune_1pct": dict(mode="finetune", epochs=60, batch_size=4096,
                          base_lr=0.05, fraction=0.01,
                          tfds_subset="imagenet2012_subset/1pct"),
    "finetune_10pct": dict(mode="finetune", epochs=30, batch_size=4096,
                           base_lr=0.05, fraction=0.1,
                           tfds_subset="imagenet2012_subset/10pct"),
}
DEFAULT_BASE_LR = {"linear": 0.2, "finetune": 0.01}
# run()'s arguments, the flags of the same names (None: the preset's value).
ARGS = dict(checkpoint=None, step=None, mode="linear", which="online",
            epochs=80.0, steps=0, batch_size=256, eval_batch_size=None,
            base_lr=None, weight_decay=0.0, train_split=None, fraction=1.0,
            seed=0, output=None, data_source=None, data_path=None,
            data_dir=None)


def run(workdir: str, preset: str | None = None, **given) -> dict[str, Any]:
  """Loads the checkpoint, trains and scores the head, writes the JSON.

  `given`: ARGS' names (None: the preset's value); returns the result.
  """
  if given.keys() - ARGS.keys():
    raise TypeError(f"Unknown arguments {sorted(given.keys() - ARGS.keys())}")
  start = time.time()
  if not workdir:
    raise ConfigError("Give --workdir=DIR (the pretraining run's workdir).")
  a = types.SimpleNamespace(**{
      **ARGS, "tfds_subset": None, **PRESETS.get(preset, {}),
      **{k: v for k, v in given.items() if v is not None}})
  a.base_lr = a.base_lr or DEFAULT_BASE_LR[a.mode]
  if a.steps <= 0 and not a.epochs > 0:
    raise ConfigError(f"--epochs={a.epochs}: give a positive number of "
                      "epochs (or --steps).")
  for name in ("batch_size", "eval_batch_size"):
    if getattr(a, name) is not None and getattr(a, name) <= 0:
      raise ConfigError(f"--{name}={getattr(a, name)} must be positive.")
  if not 0.0 < a.fraction <= 1.0:
    raise ConfigError(f"--fraction={a.fraction} must be in (0, 1].")
  source = a.checkpoint or workdir
  config, state, ckpt_step = pretrained.load_run(source, a.step)
  variables = pretrained.encoder_variables(state, a.which, source)
  with config.unlocked():  # Another copy of the same data.
    for field, value in (("source", a.data_source), ("path", a.data_path),
                         ("data_dir", a.data_dir)):
      if value:
        config.data[field] = value
    path = config.data.path
    if (config.data.source in ("npz", "folder") and path and
        "://" not in path and not epath.Path(path).exists()):
      raise ConfigError(f"The evaluation data {path} does not exist; point "
                        "--data_path at a local copy.")
    if (a.tfds_subset and config.data.source == "tfds" and
        config.data.name == "imagenet2012" and a.train_split is None):
      config.data.name = a.tfds_subset  # The published subsets.
      a.fraction = 1.0
  info = data.describe(config)
  if info.num_classes == 1:
    progress.say(progress.single_class_warning(info.name))
  evaluate = linear.LinearEvaluator(
      config, network.make_encoder(config), sharding.make_mesh(),
      epochs=a.epochs, steps=a.steps, batch_size=a.batch_size,
      eval_batch_size=a.eval_batch_size, base_lr=a.base_lr,
      finetune=(a.mode == "finetune"), weight_decay=a.weight_decay,
      seed=a.seed, train_split=a.train_split, fraction=a.fraction)
  summary = {k: v for k, v in evaluate(variables).items()
             if isinstance(v, (int, float, bool, str))}
  summary.update(
      mode=a.mode, preset=preset or "", which=a.which,
      checkpoint=str(source), checkpoint_step=int(ckpt_step),
      method=config.method, depth=config.model.depth,
      width=config.model.width, dataset=info.name,
      eval_split=config.data.eval_split,
      device_kind=jax.devices()[0].device_kind,
      device_count=jax.device_count(), process_count=jax.process_count(),
      wall_seconds=time.time() - start)
  output = a.output or str(epath.Path(workdir) / (
      "finetune.json" if a.mode == "finetune" else "linear_eval.json"))
  if jax.process_index() == 0:
    out = epath.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  summary["output"] = output
  return summary


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "The pretraining run's workdir; the "
                      "JSON result goes here.")
  flags.DEFINE_string("checkpoint", None, "A workdir, its checkpoints/ "
                      "directory or one step's directory (default: --workdir).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
  flags.DEFINE_enum("preset", None, sorted(PRESETS),
                    "A protocol; explicit flags override its values.")
  flags.DEFINE_enum("mode", None, ["linear", "finetune"],
                    "linear: frozen encoder; finetune: train it too.")
  flags.DEFINE_enum("which", "online", ["online", "target"],
                    "Which encoder: online, or BYOL's EMA target.")
  flags.DEFINE_float("epochs", None, "Epochs over the labelled set.")
  flags.DEFINE_integer("steps", 0, "If > 0, steps instead of epochs.")
  flags.DEFINE_integer("batch_size", None, "Global batch size.")
  flags.DEFINE_integer("eval_batch_size", None,
                       "Global eval batch (default: --batch_size).")
  flags.DEFINE_float("base_lr", None, "LR at batch 256 (default 0.2 linear, "
                     "0.01 finetune).")
  flags.DEFINE_float("weight_decay", 0.0, "On kernels only.")
  flags.DEFINE_string("train_split", None, "The labelled split (default: the "
                      "run's train split); TFDS slicing such as train[:10%] "
                      "works for TFDS sources.")
  flags.DEFINE_float("fraction", None, "Use this fraction of the labelled "
                     "split, class-balanced and deterministic per --seed.")
  flags.DEFINE_integer("seed", 0, "Head init, data order and subset.")
  flags.DEFINE_string("output", None, "Where to write the JSON result.")
  flags.DEFINE_string("data_source", None,
                      "Override config.data.source (tfds|folder|npz|...).")
  flags.DEFINE_string("data_path", None,
                      "Override config.data.path (image folder or .npz).")
  flags.DEFINE_string("data_dir", None, "Override config.data.data_dir.")
  cli.define_multihost_flags()


def main(argv):
  del argv  # Flags only (cli.run).
  cli.join_job()
  f = flags.FLAGS
  try:
    s = run(f.workdir, f.preset, **{n: f[n].value for n in ARGS})
  except FloatingPointError as e:  # Diverged: the message names the fix.
    cli.exit_error(str(e))
  if jax.process_index() == 0:
    top5 = (f" top-5 {100 * s['top5']:.2f}%" if s.get("top5") is not None
            else "")
    print(f"{s['mode']} eval of the {s['which']} encoder at step "
          f"{s['checkpoint_step']}: top-1 {100 * s['top1']:.2f}%{top5} "
          f"({s['epochs']:g} epochs of {s['num_train_examples']} images, "
          f"batch {s['batch_size']}, {s['wall_seconds']:.0f} s on "
          f"{s['device_count']} x {s['device_kind']}) -> {s['output']}",
          flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
