r"""BYOL on Imagenette: ResNet-18, 128 px crops, batch 256, base LR 2.0.

The official small set-up (about 4 h on one V100 for 1000 epochs).

  python -m byol_jax.train --config=configs/byol_imagenette.py --workdir=DIR
  python -m byol_jax.train \
      --config=configs/byol_imagenette.py:source=folder,path=/data/imagenette ...
"""
from byol_jax.trainer import config_lib


def get_config(arg=None):
  """ARG: epochs=N, source=tfds|folder|npz, path=..., batch=N."""
  arg = config_lib.parse_arg(arg, epochs=1000, source="tfds", path="",
                             batch=256)
  c = config_lib.base_config()
  c.method = "byol"
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.warmup_epochs = 10
  c.model.depth = 18
  c.model.stem = "imagenet"
  c.optimizer.name = "lars"
  c.optimizer.base_lr = 2.0
  c.optimizer.weight_decay = 1e-6
  c.tau_base = 0.99
  c.data.source = arg.source
  c.data.name = "imagenette/full-size-v2"
  c.data.path = arg.path
  c.data.train_split = "train"
  # TFDS's Imagenette: 10 classes, 'validation'; other sources: from the data.
  c.data.eval_split = "validation" if arg.source == "tfds" else ""
  c.data.num_classes = 10 if arg.source == "tfds" else -1
  c.data.image_size = 128
  c.knn.enabled = True
  c.eval_every_steps = 2000
  c.log_every_steps = 50
  return c
