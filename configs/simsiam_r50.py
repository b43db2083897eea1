r"""SimSiam on ImageNet: ResNet-50, batch 512, 100 epochs (68.1% linear).

  python -m byol_jax.train --config=configs/simsiam_r50.py --workdir=DIR

SGD with momentum, lr 0.05 x batch/256, weight decay 1e-4, cosine decay with
the predictor's LR held fixed; the same augmentations for both views.
"""
from byol_jax.trainer import config_lib


def get_config(arg=None):
  """ARG: epochs=N, source=tfds|folder|npz, path=..., batch=N."""
  arg = config_lib.parse_arg(arg, epochs=100, source="tfds", path="",
                             batch=512)
  c = config_lib.base_config()
  c.method = "simsiam"
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.warmup_epochs = 0
  c.model.depth = 50
  c.model.stem = "imagenet"
  c.model.dtype = "bfloat16"
  c.projector.update(hidden_dim=2048, output_dim=2048, num_layers=3)
  c.predictor.update(hidden_dim=512, output_dim=2048, num_layers=2)
  c.optimizer.name = "sgd"
  c.optimizer.classifier = "sgd"  # solo-learn: its own SGD
  c.optimizer.base_lr = 0.05
  c.optimizer.weight_decay = 1e-4
  c.optimizer.momentum = 0.9
  c.optimizer.fixed_lr_predictor = True
  c.data.source = arg.source
  c.data.name = "imagenet2012"
  c.data.path = arg.path
  # TFDS's ImageNet: 1000 classes, 'validation'; other sources: from the data.
  c.data.eval_split = "validation" if arg.source == "tfds" else ""
  c.data.num_classes = 1000 if arg.source == "tfds" else -1
  c.data.image_size = 224
  # Crops up to 448 px go to the accelerators unresized (README, "Host
  # path"): ~1.5x the samples per host CPU-second on ImageNet's JPEGs, for
  # resampling under 2% of the step's FLOPs (benchmarks/results/tpu_aot.md).
  c.data.canvas_size = 448
  c.data.crop_scale = (0.2, 1.0)
  view = config_lib.view_augment(brightness=0.4, contrast=0.4, saturation=0.4,
                                 hue=0.1, blur=0.5, solarize=0.0)
  c.augment.view1 = view
  c.augment.view2 = dict(view)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  c.checkpoint_every_minutes = 30.0
  return c
