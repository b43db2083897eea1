r"""SimCLR on ImageNet: ResNet-50, batch 4096, 100 epochs, temperature 0.1.

  python -m byol_jax.train --config=configs/simclr_r50.py --workdir=DIR

NT-Xent over the global batch (8,190 negatives per view at batch 4096), LARS
with lr 0.3 x batch/256 (`:lr_scaling=sqrt` gives 0.075 sqrt(batch)), weight
decay 1e-6, 10 warm-up epochs; 3-layer head to 128 (SimCLR v2); colour-jitter
strength 1.0 and blur p 0.5 in both views, no solarize.
"""
from byol_jax.trainer import config_lib


def get_config(arg=None):
  """ARG: epochs=N, source=..., path=..., batch=N, lr_scaling=linear|sqrt."""
  arg = config_lib.parse_arg(arg, epochs=100, source="tfds", path="",
                             batch=4096, lr_scaling="linear")
  c = config_lib.base_config()
  c.method = "simclr"
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.warmup_epochs = 10
  c.temperature = 0.1
  c.model.depth = 50
  c.model.stem = "imagenet"
  c.model.dtype = "bfloat16"
  c.projector.update(hidden_dim=2048, output_dim=128, num_layers=3)
  c.optimizer.name = "lars"
  c.optimizer.classifier = "sgd"  # solo-learn: its own SGD
  c.optimizer.lr_scaling = arg.lr_scaling
  c.optimizer.base_lr = 0.3 if arg.lr_scaling == "linear" else 0.075
  c.optimizer.weight_decay = 1e-6
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
  view = config_lib.view_augment(brightness=0.8, contrast=0.8, saturation=0.8,
                                 hue=0.2, blur=0.5, solarize=0.0)
  c.augment.view1 = view
  c.augment.view2 = dict(view)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  c.checkpoint_every_minutes = 30.0
  return c
