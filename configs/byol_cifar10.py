r"""BYOL on CIFAR-10: ResNet-18 with the CIFAR stem, batch 256, 1000 epochs.

solo-learn's recipe (92.58% online linear after 1000 epochs, DESIGN 5): LARS
with eta 0.02 and LR clipping, base LR 1.0, weight decay 1e-5, tau 0.99 -> 1,
the online classifier on its own SGD at 0.1 x batch/256. (The paper's eta
1e-3 was tuned for batch 4096 on ImageNet.)

  python -m byol_jax.train --config=configs/byol_cifar10.py --workdir=DIR
  # offline, from a local copy (an image folder or a packed .npz):
  python -m byol_jax.train \
      --config=configs/byol_cifar10.py:source=folder,path=/data/cifar10 ...

The dataset (50,000 x 32 x 32 x 3 uint8, 150 MB) lives on the accelerators and
is cropped and augmented there, so training never waits for the host.
"""
from byol_jax.trainer import config_lib


def get_config(arg=None):
  """ARG: epochs=N, source=tfds|folder|npz|arrays, path=..., batch=N."""
  arg = config_lib.parse_arg(arg, epochs=1000, source="tfds", path="",
                             batch=256)
  c = config_lib.base_config()
  c.method = "byol"
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.warmup_epochs = 10
  c.model.depth = 18
  c.model.stem = "cifar"
  c.optimizer.name = "lars"
  c.optimizer.eta = 0.02
  c.optimizer.clip_lr = True
  c.optimizer.base_lr = 1.0
  c.optimizer.weight_decay = 1e-5
  c.optimizer.classifier = "sgd"
  c.optimizer.classifier_lr = 0.1
  c.tau_base = 0.99
  config_lib.set_cifar10_data(c, arg.source, arg.path)
  # Blur off for 32 px images; solarize only in T'.
  c.augment.view1 = config_lib.view_augment(blur=0.0, solarize=0.0)
  c.augment.view2 = config_lib.view_augment(blur=0.0, solarize=0.2)
  c.eval_every_steps = 5000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
