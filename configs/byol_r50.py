r"""BYOL on ImageNet with ResNet-50, as in the paper (global batch 4096).

  python -m byol_jax.train --config=configs/byol_r50.py:epochs=300 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --workdir=DIR

Presets (DESIGN section 3): epochs -> (base LR, weight decay, tau_base).
On 512 TPU v3 cores the per-device batch is 4096 / 512 = 8.
"""
from byol_jax.trainer import config_lib

PRESETS = {
    40: dict(base_lr=0.45, weight_decay=1e-6, tau_base=0.97),
    100: dict(base_lr=0.45, weight_decay=1e-6, tau_base=0.99),
    300: dict(base_lr=0.3, weight_decay=1e-6, tau_base=0.99),
    1000: dict(base_lr=0.2, weight_decay=1.5e-6, tau_base=0.996),
}


def get_config(arg=None):
  """ARG: epochs=40|100|300|1000, source=tfds|folder|npz, path=DIR."""
  arg = config_lib.parse_arg(arg, epochs=300, source="tfds", path="")
  if arg.epochs not in PRESETS:
    raise ValueError(f"epochs={arg.epochs} has no preset; use one of "
                     f"{sorted(PRESETS)}.")
  preset = PRESETS[arg.epochs]
  c = config_lib.base_config()
  c.method = "byol"
  c.batch_size = 4096
  c.num_epochs = arg.epochs
  c.warmup_epochs = 10
  c.model.depth = 50
  c.model.stem = "imagenet"
  c.model.dtype = "bfloat16"
  c.optimizer.name = "lars"
  c.optimizer.base_lr = preset["base_lr"]
  c.optimizer.weight_decay = preset["weight_decay"]
  c.tau_base = preset["tau_base"]
  c.data.source = arg.source
  c.data.name = "imagenet2012"
  c.data.path = arg.path
  c.data.train_split = "train"
  # TFDS's ImageNet: 1000 classes, 'validation'; other sources: from the data.
  c.data.eval_split = "validation" if arg.source == "tfds" else ""
  c.data.num_classes = 1000 if arg.source == "tfds" else -1
  c.data.image_size = 224
  # Crops up to 448 px go to the accelerators unresized (README, "Host
  # path"): ~1.5x the samples per host CPU-second on ImageNet's JPEGs, for
  # resampling under 2% of the step's FLOPs (benchmarks/results/tpu_aot.md).
  c.data.canvas_size = 448
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  c.checkpoint_every_minutes = 30.0
  c.eval_every_steps = 0
  return c
