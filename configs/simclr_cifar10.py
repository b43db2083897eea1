r"""SimCLR on CIFAR-10: ResNet-18 CIFAR stem, batch 256, 1000 epochs.

  python -m byol_jax.train --config=configs/simclr_cifar10.py --workdir=DIR

Hyper-parameters of strong CIFAR implementations (solo-learn: 90.74% online
linear after 1000 epochs): LARS lr 0.4 x batch/256, eta 0.02 with LR
clipping, weight decay 1e-4, temperature 0.2, online classifier on its own
SGD at 0.1 x batch/256; the head 2048 -> 128 of the SimCLR reference
(DESIGN 4); colour-jitter strength 1.0, no blur at 32 px, data on the
accelerator.
"""
from byol_jax.trainer import config_lib


def get_config(arg=None):
  """ARG: epochs=N, source=..., path=..., batch=N, temperature=T."""
  arg = config_lib.parse_arg(arg, epochs=1000, source="tfds", path="",
                             batch=256, temperature=0.2)
  c = config_lib.base_config()
  c.method = "simclr"
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.warmup_epochs = 10
  c.temperature = arg.temperature
  c.model.depth = 18
  c.model.stem = "cifar"
  c.projector.update(hidden_dim=2048, output_dim=128, num_layers=2)
  c.optimizer.name = "lars"
  c.optimizer.classifier = "sgd"  # solo-learn: its own SGD
  c.optimizer.base_lr = 0.4
  c.optimizer.eta = 0.02
  c.optimizer.clip_lr = True
  c.optimizer.weight_decay = 1e-4
  config_lib.set_cifar10_data(c, arg.source, arg.path)
  view = config_lib.view_augment(brightness=0.8, contrast=0.8, saturation=0.8,
                                 hue=0.2, blur=0.0, solarize=0.0)
  c.augment.view1 = view
  c.augment.view2 = dict(view)
  c.eval_every_steps = 5000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
