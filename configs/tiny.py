r"""A tiny run for CPUs, tests and the README smoke run (README, Quickstart).

Narrow ResNet-10 (8 base filters, one block per stage), small heads, 32 px CIFAR-10 images from
the packed subset in ../shared/datasets, on-device data path, and milder
augmentations than the paper's (they suit runs of a few hundred steps).

  python -m byol_jax.train --config=configs/tiny.py --workdir=/tmp/tiny
  python -m byol_jax.train --config=configs/tiny.py:method=simclr ...
"""
import os

from byol_jax.trainer import config_lib

_DEFAULT_NPZ = os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                            "datasets", "cifar10_small.npz")


def get_config(arg=None):
  """ARG: method=byol|simsiam|simclr, steps=N, batch=N, source=..., path=..."""
  arg = config_lib.parse_arg(arg, method="byol", steps=60, batch=64,
                             source="npz", path=os.path.normpath(_DEFAULT_NPZ))
  c = config_lib.base_config()
  c.method = arg.method
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.warmup_epochs = 1
  c.model.depth = 10
  c.model.num_filters = 8
  c.model.stem = "cifar"
  c.projector.hidden_dim = 64
  c.projector.output_dim = 32
  c.predictor.hidden_dim = 64
  c.predictor.output_dim = 32
  if arg.method == "simsiam":
    c.projector.num_layers = 3
    c.projector.output_dim = 64
    c.predictor.hidden_dim = 32
    c.predictor.output_dim = 64
    c.optimizer.name = "sgd"
    c.optimizer.base_lr = 0.5   # solo-learn's CIFAR value
    c.optimizer.weight_decay = 1e-5
    c.optimizer.fixed_lr_predictor = True
  elif arg.method == "simclr":
    c.projector.num_layers = 3
    c.temperature = 0.2
  if arg.method != "simsiam":
    c.optimizer.name = "lars"
    c.optimizer.base_lr = 1.0
    c.optimizer.weight_decay = 1e-5
  if arg.method != "byol":  # solo-learn: the classifier has its own SGD.
    c.optimizer.classifier = "sgd"
  c.tau_base = 0.99
  config_lib.set_cifar10_data(c, arg.source, arg.path)
  # Half-strength colour jitter and crops of at least 20% of the image: in a
  # few hundred CPU steps the full recipe leaves BYOL's features below a
  # random encoder's in a short linear probe (README, Results).
  c.data.crop_scale = (0.2, 1.0)
  jitter = dict(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.05)
  if arg.method == "simsiam":
    # SimSiam keeps the full-strength jitter: with the half-strength one its
    # features do not beat a random encoder's in a short probe (README,
    # Results; tests/test_train.py).
    jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
  c.augment.view1 = config_lib.view_augment(blur=0.0, solarize=0.0, **jitter)
  c.augment.view2 = config_lib.view_augment(blur=0.0, solarize=0.2, **jitter)
  c.knn.k = 20
  c.eval_every_steps = 0
  c.eval_batch_size = 256  # Fewer, larger evaluation batches on CPUs.
  c.log_every_steps = 10
  c.checkpoint_every_steps = 20
  c.keep_checkpoints = 3
  return c
