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
import inspect
import json
import time
from typing import Any

import jax
from absl import flags
from etils import epath

from byol_jax import data
from byol_jax.trainer import cli
from byol_jax.interop import pretrained
from byol_jax import progress
from byol_jax.core import sharding
from byol_jax.errors import ConfigError
from byol_jax.evaluation import linear
from byol_jax.core.methods import network

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


def run(workdir: str, checkpoint: str | None = None, step: int | None = None,
        preset: str | None = None, which: str = "online", steps: int = 0,
        eval_batch_size: int | None = None, weight_decay: float = 0.0,
        train_split: str | None = None, seed: int = 0,
        output: str | None = None, data_source: str | None = None,
        data_path: str | None = None, data_dir: str | None = None,
        **given) -> dict[str, Any]:
  """Loads the checkpoint, trains and scores the head, writes the JSON.

  The arguments are the flags' (`given`: None is the preset's value).
  """
  start = time.time()
  if not workdir:
    raise ConfigError("Give --workdir=DIR (the pretraining run's workdir).")
  s = dict(mode="linear", epochs=80.0, batch_size=256, base_lr=None,
           fraction=1.0, tfds_subset=None)
  s.update(PRESETS.get(preset, {}))
  s.update({k: v for k, v in given.items() if v is not None})
  s["base_lr"] = s["base_lr"] or DEFAULT_BASE_LR[s["mode"]]
  if steps <= 0 and not s["epochs"] > 0:
    raise ConfigError(f"--epochs={s['epochs']}: give a positive number of "
                      "epochs (or --steps).")
  for name, value in (("batch_size", s["batch_size"]),
                      ("eval_batch_size", eval_batch_size)):
    if value is not None and value <= 0:
      raise ConfigError(f"--{name}={value} must be positive.")
  if not 0.0 < s["fraction"] <= 1.0:
    raise ConfigError(f"--fraction={s['fraction']} must be in (0, 1].")
  source = checkpoint or workdir
  config, state, ckpt_step = pretrained.load_run(source, step)
  variables = pretrained.encoder_variables(state, which, source)
  with config.unlocked():  # Another copy of the same data.
    for field, value in (("source", data_source), ("path", data_path),
                         ("data_dir", data_dir)):
      if value:
        config.data[field] = value
    path = config.data.path
    if (config.data.source in ("npz", "folder") and path and
        "://" not in path and not epath.Path(path).exists()):
      raise ConfigError(f"The evaluation data {path} does not exist; point "
                        "--data_path at a local copy.")
    fraction = s["fraction"]
    if (s["tfds_subset"] and config.data.source == "tfds" and
        config.data.name == "imagenet2012" and train_split is None):
      config.data.name = s["tfds_subset"]  # The published subsets.
      fraction = 1.0
  info = data.describe(config)
  if info.num_classes == 1:
    progress.say(progress.single_class_warning(info.name))
  evaluate = linear.LinearEvaluator(
      config, network.make_encoder(config), sharding.make_mesh(),
      epochs=s["epochs"], steps=steps, batch_size=s["batch_size"],
      eval_batch_size=eval_batch_size, base_lr=s["base_lr"],
      finetune=(s["mode"] == "finetune"), weight_decay=weight_decay,
      seed=seed, train_split=train_split, fraction=fraction)
  summary = {k: v for k, v in evaluate(variables).items()
             if isinstance(v, (int, float, bool, str))}
  summary.update(
      mode=s["mode"], preset=preset or "", which=which,
      checkpoint=str(source), checkpoint_step=int(ckpt_step),
      method=config.method, depth=config.model.depth,
      width=config.model.width, dataset=info.name,
      eval_split=config.data.eval_split,
      device_kind=jax.devices()[0].device_kind,
      device_count=jax.device_count(), process_count=jax.process_count(),
      wall_seconds=time.time() - start)
  output = output or str(epath.Path(workdir) / (
      "finetune.json" if s["mode"] == "finetune" else "linear_eval.json"))
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
  names = inspect.signature(run).parameters.keys() - {"given"}
  f = flags.FLAGS
  try:
    s = run(**{n: f[n].value for n in names}, mode=f.mode, epochs=f.epochs,
            batch_size=f.batch_size, base_lr=f.base_lr, fraction=f.fraction)
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
