"""Config checks before anything is compiled: one line per problem (the
data is checked by `data.describe`, the workdir by `workdir`)."""
import ml_collections
from jax.sharding import Mesh

from byol_jax.core import methods
from byol_jax.core import models
from byol_jax.core import optim
from byol_jax.core import sharding
from byol_jax.errors import ConfigError

_DEPTHS = tuple(sorted(models.DEPTHS))
_DTYPES = ("float32", "bfloat16")
_PROBABILITIES = ("flip", "color_jitter", "grayscale", "blur", "solarize")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _positive(config, *names, allow_zero=False) -> None:
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    ok = value >= 0 if allow_zero else value > 0
    _require(ok, f"config.{name}={value} must be "
             f"{'>= 0' if allow_zero else '> 0'}; set --config.{name}.")


def _pair(config, name: str, low: float, high: float) -> None:
  value = config.data[name]
  ok = (isinstance(value, (tuple, list)) and len(value) == 2 and
        low < value[0] <= value[1] <= high)
  _require(ok, f"config.data.{name}={value!r} must be a pair (a, b) with "
           f"{low} < a <= b <= {high}; e.g. --config.data.{name}='(0.2,1.0)'.")


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Raises ConfigError for settings that cannot work."""
  methods.get(config.method)
  sharding.check_batch_size(int(config.batch_size), mesh)
  m = config.model
  _require(m.depth in _DEPTHS, f"model.depth={m.depth} is not a ResNet "
           f"depth; use one of {', '.join(map(str, _DEPTHS))}.")
  _require(m.stem in ("imagenet", "cifar"),
           f"model.stem={m.stem!r}; use 'imagenet' or 'cifar'.")
  _require(m.dtype != "float16", "model.dtype='float16' trains without loss "
           "scaling, so its gradients underflow; use "
           "--config.model.dtype=bfloat16 (or float32).")
  _require(m.dtype in _DTYPES, f"model.dtype={m.dtype!r}; use one of "
           f"{', '.join(_DTYPES)}.")
  if "padding" in m:
    _require(m.padding in ("symmetric", "same"), f"model.padding="
             f"{m.padding!r}; use 'symmetric' (PyTorch) or 'same' (TF/Haiku).")
  _positive(config, "model.width", "model.num_filters",
            "projector.hidden_dim", "projector.output_dim",
            "projector.num_layers", "data.image_size", "log_every_steps",
            "keep_checkpoints", "optimizer.base_lr", "temperature")
  if config.method != "simclr":
    _positive(config, "predictor.hidden_dim", "predictor.output_dim",
              "predictor.num_layers")
  _positive(config, "total_steps", "num_epochs", "warmup_epochs",
            "checkpoint_every_steps", "checkpoint_every_minutes",
            "eval_every_steps", "eval_batch_size", "optimizer.weight_decay",
            "num_train_examples", allow_zero=True)
  _require(config.total_steps > 0 or config.num_epochs > 0,
           "Both config.total_steps and config.num_epochs are 0; set one of "
           "them > 0.")
  _require(0.0 <= config.tau_base <= 1.0,
           f"config.tau_base={config.tau_base} must be in [0, 1].")
  if config.knn.enabled:
    _positive(config, "knn.k", "knn.temperature")
  _pair(config, "crop_scale", 0.0, 1.0)
  _pair(config, "crop_ratio", 0.0, float("inf"))
  c = config.data.canvas_size
  _require(c == 0 or c >= config.data.image_size, f"config.data.canvas_size="
           f"{c} is smaller than data.image_size={config.data.image_size}; "
           "use 0 (the image size) or at least the image size.")
  f = config.data.eval_crop_fraction
  _require(0.0 < f <= 1.0, f"config.data.eval_crop_fraction={f} must be in "
           "(0, 1].")
  _require(config.data.num_classes >= -1, "config.data.num_classes="
           f"{config.data.num_classes}: use -1 (from the data), 0 (no labels)"
           " or the number of classes.")
  for view in ("view1", "view2"):
    for key in _PROBABILITIES:
      p = config.augment[view][key]
      _require(0.0 <= p <= 1.0, f"config.augment.{view}.{key}={p} is a "
               "probability; use a value in [0, 1].")
  optim.check(config.optimizer)
