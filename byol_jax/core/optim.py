"""Optimizers and schedules: LARS as in BYOL, SGD for SimSiam, EMA schedule.

LARS follows the official BYOL code (DESIGN section 3):

  u = g + wd * p                                  (kernels only)
  u = trust * u,  trust = eta * ||p|| / ||u||     (kernels only; 1 where
                                                   either norm is 0)
  m = momentum * m + u
  p = p - lr * m

`optax.lars` scales by the learning rate *before* the momentum trace, which
changes the effective step whenever the learning rate moves (warm-up, cosine),
so it is not used here.

`clip_lr=True` is solo-learn's LARS instead (its CIFAR recipes, eta 0.02):
trust = eta ||p|| / (||g|| + wd ||p|| + 1e-8), clipped to
min(trust / lr, 1), multiplies g + wd * p (kernels whose ||p|| and ||g|| are
both non-zero; g unchanged otherwise), then the momentum trace and lr.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from byol_jax import errors

_LR_SCALINGS = ("linear", "sqrt")
# The allowed values of config.optimizer's choices, the first the default.
# classifier: 'main' trains the online classifier in the main optimizer at the
# main learning rate (official BYOL), 'sgd' with its own SGD at classifier_lr
# (solo-learn's SimSiam and SimCLR).
_CHOICES = {"name": ("lars", "sgd"), "lr_scaling": _LR_SCALINGS,
            "classifier": ("main", "sgd")}


def exclude_bias_and_bn(params: Any) -> Any:
  """True for kernels (ndim > 1): biases and BN get no decay and no trust."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def lars(learning_rate: float | optax.Schedule, weight_decay: float = 0.0,
         momentum: float = 0.9, eta: float = 1e-3, nesterov: bool = False,
         mask: Any = exclude_bias_and_bn,
         clip_lr: bool = False) -> optax.GradientTransformation:
  """LARS with the learning rate applied after the momentum trace.

  Args:
    learning_rate: a constant or a schedule of the step count.
    weight_decay: decay coefficient wd (added to the gradient as wd * p).
    momentum, nesterov: of the trace (BYOL: 0.9, no Nesterov).
    eta: trust coefficient.
    mask: pytree of bools, or a function of the params returning one, that
      selects the leaves getting weight decay and the trust ratio.
    clip_lr: solo-learn's variant (module docstring) instead of BYOL's.
  """
  if clip_lr:
    scale = [optax.masked(_clipped_trust(learning_rate, weight_decay, eta),
                          mask)]
  else:
    scale = [optax.add_decayed_weights(weight_decay, mask=mask),
             # eps=0: optax then returns trust 1 where ||p|| or ||u|| is 0,
             # the reference behaviour (no NaN for zero-initialised leaves).
             optax.masked(optax.scale_by_trust_ratio(trust_coefficient=eta,
                                                     eps=0.0), mask)]
  return optax.chain(*scale, optax.trace(decay=momentum, nesterov=nesterov),
                     optax.scale_by_learning_rate(learning_rate))


def _clipped_trust(learning_rate: float | optax.Schedule, weight_decay: float,
                   eta: float, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
  """solo-learn's LARS scaling with LR clipping, weight decay included."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)

    def leaf(g, p):
      p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
      trust = eta * p_norm / (g_norm + p_norm * weight_decay + eps)
      # min(trust / lr, 1); 1 where lr is 0 (the first warm-up step).
      factor = jnp.where(trust < lr, trust / lr, 1.0)
      return jnp.where((p_norm > 0) & (g_norm > 0),
                       (g + weight_decay * p) * factor, g)

    return (jax.tree.map(leaf, updates, params),
            optax.ScaleByScheduleState(
                count=optax.safe_int32_increment(state.count)))

  return optax.GradientTransformation(init, update)


def sgd(learning_rate: float | optax.Schedule, weight_decay: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = False) -> optax.GradientTransformation:
  """SGD with momentum and weight decay wd * p on every parameter (SimSiam)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  )


def scaled_lr(base_lr: float, batch_size: int,
              scaling: str = "linear") -> float:
  """The peak learning rate for a global batch of `batch_size`.

  `scaling`: 'linear' (base_lr * batch / 256, BYOL and SimSiam) or 'sqrt'
  (base_lr * sqrt(batch), SimCLR's 0.075 * sqrt(batch)).
  """
  if scaling == "linear":
    return base_lr * batch_size / 256
  if scaling == "sqrt":
    return base_lr * math.sqrt(batch_size)
  raise ValueError(
      f"Unknown lr_scaling {scaling!r}; allowed: {list(_LR_SCALINGS)}.")


def lr_schedule(peak_lr: float, total_steps: int,
                warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_lr`, then cosine decay to 0.

  lr(0) = 0 (the peak without warm-up), lr(warmup_steps) = peak_lr,
  lr(total_steps) = 0 and 0 after that.
  """
  total_steps = max(int(total_steps), 1)
  warmup_steps = min(max(int(warmup_steps), 0), total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def tau_schedule(tau_base: float, total_steps: int) -> optax.Schedule:
  """BYOL's target decay: tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2.

  1 minus a cosine decay of (1 - tau_base) to 0 over K = `total_steps`; tau
  stays 1 after step K.
  """
  decay = optax.cosine_decay_schedule(1.0 - tau_base, max(int(total_steps), 1))
  return lambda step: 1.0 - decay(step)


def check(opt: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an optimizer config that cannot work."""
  for key, allowed in _CHOICES.items():
    if opt.get(key, allowed[0]) not in allowed:
      raise errors.ConfigError(f"Unknown optimizer.{key} {opt[key]!r}; "
                               f"allowed: {list(allowed)}.")
  if not 0.0 <= opt.momentum < 1.0:
    raise errors.ConfigError(
        f"optimizer.momentum={opt.momentum} must be in [0, 1).")
  if opt.name == "lars" and not opt.eta > 0:
    raise errors.ConfigError(f"optimizer.eta={opt.eta} must be > 0 for LARS.")


def schedule_steps(config: ml_collections.ConfigDict,
                   num_examples: int) -> tuple[int, int, int]:
  """Total, warm-up and per-epoch steps, as the official BYOL code counts.

  total = num_epochs * N // B and warm-up = warmup_epochs * N // B (N
  examples, batch B): the partial batch of each epoch counts toward the
  total, so 300 ImageNet epochs at 4096 are 93,835 steps, not
  300 * (N // B) = 93,600. config.total_steps > 0 replaces the total; total
  and per-epoch are at least 1.
  """
  batch = config.batch_size
  total = int(config.total_steps or
              int(config.num_epochs * num_examples // batch))
  warmup = int(config.warmup_epochs * num_examples // batch)
  return max(total, 1), warmup, max(num_examples // batch, 1)


def build_optimizer(
    config: ml_collections.ConfigDict, total_steps: int,
    steps_per_epoch: int, warmup_steps: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's optimizer and the learning-rate schedule of its main params.

  Parameters are split by their top-level key:
    - 'classifier' when optimizer.classifier is 'sgd' (SimSiam, SimCLR): SGD
      momentum 0.9, no weight decay, lr classifier_lr * batch / 256 with the
      same warm-up and cosine; when it is 'main' (BYOL), the main optimizer
      trains it like any other layer;
    - 'predictor' when fixed_lr_predictor (SimSiam): the main optimizer at
      the constant peak lr;
    - everything else: the main optimizer ('lars' or 'sgd') on the schedule.

  `warmup_steps` (from `schedule_steps`) defaults to warmup_epochs *
  steps_per_epoch. Returns (tx, the main learning-rate schedule).
  """
  opt = config.optimizer
  check(opt)
  if warmup_steps is None:
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
  peak_lr = scaled_lr(opt.base_lr, config.batch_size, opt.lr_scaling)
  schedule = lr_schedule(peak_lr, total_steps, warmup_steps)

  def main_tx(learning_rate):
    if opt.name == "lars":
      return lars(learning_rate, weight_decay=opt.weight_decay,
                  momentum=opt.momentum, eta=opt.eta, nesterov=opt.nesterov,
                  clip_lr=opt.get("clip_lr", False))
    return sgd(learning_rate, weight_decay=opt.weight_decay,
               momentum=opt.momentum, nesterov=opt.nesterov)

  transforms = {"main": main_tx(schedule)}
  own = {"predictor": opt.fixed_lr_predictor,
         "classifier": opt.get("classifier", "main") == "sgd"}
  if own["classifier"]:
    transforms["classifier"] = sgd(lr_schedule(
        scaled_lr(opt.classifier_lr, config.batch_size, "linear"),
        total_steps, warmup_steps), weight_decay=0.0, momentum=0.9)
  if own["predictor"]:
    transforms["predictor"] = main_tx(peak_lr)

  def label(path, _):  # By the leaf's top-level key (see methods/network.py).
    key = getattr(path[0], "key", None) if path else None
    return key if own.get(key) else "main"

  return optax.multi_transform(
      transforms,
      lambda params: jax.tree_util.tree_map_with_path(label, params)), schedule
