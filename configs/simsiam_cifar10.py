r"""SimSiam on CIFAR-10: ResNet-18 CIFAR stem, batch 256, 1000 epochs.

  python -m byol_jax.train --config=configs/simsiam_cifar10.py --workdir=DIR

Hyper-parameters of strong CIFAR implementations (solo-learn: 90.51% online
linear after 1000 epochs): SGD lr 0.5 x batch/256, weight decay 1e-5,
projector 2048-2048-2048, predictor 2048 -> 512 -> 2048 with a fixed LR;
the SimSiam reference's augmentations (DESIGN 4: crops from 20% of the
image, jitter 0.4/0.4/0.4/0.1), the same for both views, no blur at 32 px;
data on the accelerator.
"""
from byol_jax.trainer import config_lib


def get_config(arg=None):
  """ARG: epochs=N, source=tfds|folder|npz|arrays, path=..., batch=N."""
  arg = config_lib.parse_arg(arg, epochs=1000, source="tfds", path="",
                             batch=256)
  c = config_lib.base_config()
  c.method = "simsiam"
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.warmup_epochs = 10
  c.model.depth = 18
  c.model.stem = "cifar"
  c.projector.update(hidden_dim=2048, output_dim=2048, num_layers=3)
  c.predictor.update(hidden_dim=512, output_dim=2048, num_layers=2)
  c.optimizer.name = "sgd"
  c.optimizer.classifier = "sgd"  # solo-learn: its own SGD
  c.optimizer.base_lr = 0.5
  c.optimizer.weight_decay = 1e-5
  c.optimizer.fixed_lr_predictor = True
  config_lib.set_cifar10_data(c, arg.source, arg.path)
  c.data.crop_scale = (0.2, 1.0)
  view = config_lib.view_augment(brightness=0.4, contrast=0.4, saturation=0.4,
                                 hue=0.1, blur=0.0, solarize=0.0)
  c.augment.view1 = view
  c.augment.view2 = dict(view)
  c.eval_every_steps = 5000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
