"""The config schema of every config file, the parser of its `:ARG`, and
the JSON a checkpoint stores it as."""
import copy
import json
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2' (k2=True) into a ConfigDict typed by `spec`; raises
  ValueError for an unknown key or a value of the wrong type."""
  result = ml_collections.ConfigDict(spec)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in spec:
      raise ValueError(
          f"Unknown config argument {key!r}; allowed: {sorted(spec)}.")
    if not sep or isinstance(spec[key], bool):
      result[key] = not sep or value.lower() in ("1", "true", "yes", "y")
    else:
      result[key] = type(spec[key])(value)
  return result


def view_augment(*, flip=0.5, color_jitter=0.8, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1, grayscale=0.2, blur=1.0,
                 solarize=0.0) -> dict[str, float]:
  """One view's augmentation probabilities and strengths (BYOL's T)."""
  return dict(flip=flip, color_jitter=color_jitter, brightness=brightness,
              contrast=contrast, saturation=saturation, hue=hue,
              grayscale=grayscale, blur=blur, solarize=solarize)


def set_cifar10_data(c: ml_collections.ConfigDict, source: str,
                     path: str) -> None:
  """CIFAR-10's recipe at 32 px on the accelerators, kNN monitor on; a
  source other than 'tfds' brings its own classes and eval split."""
  tfds = source == "tfds"
  c.data.update(dict(source=source, name="cifar10", path=path,
                     train_split="train", eval_split="test" if tfds else "",
                     num_classes=10 if tfds else -1, image_size=32,
                     eval_crop_fraction=1.0, on_device=True))
  c.knn.enabled = True


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with BYOL's defaults."""
  c = ml_collections.ConfigDict()
  c.method = "byol"  # 'byol' | 'simsiam' | 'simclr'
  c.seed = 0

  # --- Schedule. Steps derive from epochs unless total_steps > 0.
  c.batch_size = 4096          # global batch, over all devices and hosts
  c.num_epochs = 300
  c.total_steps = 0            # > 0 overrides num_epochs
  c.warmup_epochs = 10.0
  c.num_train_examples = 0     # 0: take it from the dataset

  # --- Encoder: getattr(byol_jax.core.models, model.name)(**model_kwargs).
  c.model = ml_collections.ConfigDict()
  c.model.depth = 50                # 10, 18, 34, 50, 101, 152, 200
  c.model.width = 1                 # width multiplier 1..4
  c.model.num_filters = 64          # stem channels at width 1 (tests: 8)
  c.model.stem = "imagenet"         # 'imagenet' | 'cifar'
  c.model.padding = "symmetric"     # 'symmetric' (PyTorch) | 'same' (TF/Haiku)
  c.model.dtype = "float32"         # computation dtype; params stay float32
  c.model.zero_init_residual = False
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5

  # --- Heads.
  c.projector = ml_collections.ConfigDict(
      dict(hidden_dim=4096, output_dim=256, num_layers=2))
  c.predictor = ml_collections.ConfigDict(
      dict(hidden_dim=4096, output_dim=256, num_layers=2))

  # --- Method.
  c.tau_base = 0.99            # BYOL target EMA, cosine to 1
  c.temperature = 0.1          # SimCLR NT-Xent

  # --- Optimizer.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "lars"         # 'lars' | 'sgd'
  c.optimizer.base_lr = 0.3         # lr = base_lr * batch_size / 256
  c.optimizer.lr_scaling = "linear"  # 'linear' | 'sqrt' (0.075 sqrt(batch))
  c.optimizer.weight_decay = 1e-6
  c.optimizer.momentum = 0.9
  c.optimizer.eta = 1e-3
  c.optimizer.clip_lr = False       # LARS: solo-learn's LR clipping (CIFAR)
  c.optimizer.nesterov = False
  c.optimizer.fixed_lr_predictor = False  # SimSiam: predictor LR not decayed
  # Online classifier: 'main' in the main optimizer (official BYOL); 'sgd':
  # its own SGD-momentum at classifier_lr * batch / 256 (solo-learn).
  c.optimizer.classifier = "main"
  c.optimizer.classifier_lr = 0.1

  # --- Data.
  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"         # 'tfds' | 'folder' | 'npz' | 'arrays'
  c.data.name = "imagenet2012"   # TFDS name
  c.data.data_dir = ""           # TFDS data_dir (e.g. a gs:// bucket)
  c.data.path = ""               # image-folder root or .npz file
  c.data.train_split = "train"
  c.data.eval_split = ""         # "": the first of val, validation, test
  c.data.num_classes = -1        # -1: from the data; 0: no labels; N: check
  c.data.image_size = 224
  # Host path: crops up to C x C go to the accelerators unresized (0: C =
  # image_size); 2 x image_size where the host's CPUs limit (README, Speed).
  c.data.canvas_size = 0
  c.data.crop_scale = (0.08, 1.0)
  c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.data.eval_crop_fraction = 0.875  # centre crop of the shorter side
  c.data.on_device = False       # keep the uint8 set on the accelerators
  c.data.shuffle_buffer = 10_000
  c.data.cache = False
  c.data.skip_corrupt = True     # corrupt images in folders: skip and count
  # Undecodable images are replaced; the run stops past this fraction.
  c.data.max_undecodable_fraction = 0.01
  c.data.num_parallel_calls = -1  # tf.data AUTOTUNE

  # --- Device-side augmentations, per view (T and T').
  c.augment = ml_collections.ConfigDict()
  c.augment.view1 = view_augment()
  c.augment.view2 = view_augment(blur=0.1, solarize=0.2)
  c.augment.normalize = True     # ImageNet mean/std

  # --- Evaluation during training.
  c.eval_every_steps = 0         # 0: only at the end (if the data has labels)
  # Images per evaluation batch (forward passes only); 0: batch_size.
  c.eval_batch_size = 0
  # kNN monitor at every evaluation; `target`: also on BYOL's EMA encoder.
  c.knn = ml_collections.ConfigDict(
      dict(enabled=False, k=200, temperature=0.1, target=False))

  # --- Logging and checkpoints.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.checkpoint_every_minutes = 0.0  # 0: off
  c.keep_checkpoints = 3
  return c


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


def config_from_json(d: dict) -> ml_collections.ConfigDict:
  """Inverse of `config_to_json`; fields it lacks (a checkpoint written
  before they existed) take their `base_config()` defaults."""
  d = copy.deepcopy(dict(d))
  # Written before optimizer.classifier existed: the classifier had its own
  # SGD then (so a SimSiam or SimCLR run resumes as it was).
  if isinstance(d.get("optimizer"), dict):
    d["optimizer"].setdefault("classifier", "sgd")

  def fill(d, defaults):
    for key, value in defaults.items():
      if isinstance(value, dict) and isinstance(d.get(key), dict):
        fill(d[key], value)
      d.setdefault(key, value)
  fill(d, config_to_json(base_config()))
  config = ml_collections.ConfigDict(d)
  for key in ("crop_scale", "crop_ratio"):
    if key in config.data:
      config.data[key] = tuple(config.data[key])
  return config
