"""Optimizers and schedules: LARS as in BYOL, SGD for SimSiam, EMA schedule.

LARS follows the official BYOL code (DESIGN section 3); on kernels only,
u = trust * (g + wd * p) with trust = eta ||p|| / ||u|| (1 where a norm is 0),
then m = momentum * m + u and p = p - lr * m. `optax.lars` scales by the
learning rate before the momentum trace, which changes the effective step
whenever the learning rate moves, so it is not used.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from byol_jax import errors

# Allowed values, the first the default. classifier: 'main' trains the online
# classifier in the main optimizer (BYOL), 'sgd' with its own (solo-learn).
_CHOICES = {"name": ("lars", "sgd"), "lr_scaling": ("linear", "sqrt"),
            "classifier": ("main", "sgd")}


def exclude_bias_and_bn(params: Any) -> Any:
  """True for kernels (ndim > 1): biases and BN get no decay and no trust."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def lars(learning_rate: float | optax.Schedule, weight_decay: float = 0.0,
         momentum: float = 0.9, eta: float = 1e-3, nesterov: bool = False,
         mask: Any = exclude_bias_and_bn,
         clip_lr: bool = False) -> optax.GradientTransformation:
  """LARS with the learning rate (constant or schedule) after the trace.

  `mask` (bools, or a function of the params returning them) selects the
  leaves getting weight decay and the trust ratio; `clip_lr`: solo-learn's.
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


def _clipped_trust(learning_rate, weight_decay: float, eta: float,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """solo-learn: (g + wd p) min(eta ||p|| / (||g|| + wd ||p|| + eps) / lr, 1).

  Only where ||p|| and ||g|| are non-zero; g unchanged elsewhere.
  """

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

  return optax.GradientTransformation(
      lambda _: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)),
      update)


def sgd(learning_rate: float | optax.Schedule, weight_decay: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = False) -> optax.GradientTransformation:
  """SGD with momentum and weight decay wd * p on every parameter (SimSiam)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.trace(decay=momentum, nesterov=nesterov),
                     optax.scale_by_learning_rate(learning_rate))


def scaled_lr(base_lr: float, batch_size: int,
              scaling: str = "linear") -> float:
  """base_lr * batch / 256 ('linear') or base_lr * sqrt(batch) ('sqrt')."""
  if scaling not in _CHOICES["lr_scaling"]:
    raise ValueError(f"Unknown lr_scaling {scaling!r}; "
                     f"allowed: {list(_CHOICES['lr_scaling'])}.")
  if scaling == "sqrt":
    return base_lr * math.sqrt(batch_size)
  return base_lr * batch_size / 256


def lr_schedule(peak_lr: float, total_steps: int,
                warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 (the peak without warm-up), cosine decay to 0."""
  total_steps = max(int(total_steps), 1)
  warmup_steps = min(max(int(warmup_steps), 0), total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def tau_schedule(tau_base: float, total_steps: int) -> optax.Schedule:
  """BYOL's target decay 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, then 1."""
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

  epochs * N // B (the partial batch of each epoch counts); config.total_steps
  > 0 replaces the total.
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

  By top-level key: 'classifier' gets its own SGD (momentum 0.9, no decay, at
  classifier_lr * batch / 256 on the same schedule) when optimizer.classifier
  is 'sgd'; 'predictor' the main optimizer at the constant peak lr when
  fixed_lr_predictor (SimSiam); everything else the main optimizer on the
  schedule. `warmup_steps` defaults to warmup_epochs * steps_per_epoch.
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
  if opt.get("classifier", "main") == "sgd":
    transforms["classifier"] = sgd(lr_schedule(
        scaled_lr(opt.classifier_lr, config.batch_size), total_steps,
        warmup_steps), weight_decay=0.0, momentum=0.9)
  if opt.fixed_lr_predictor:
    transforms["predictor"] = main_tx(peak_lr)

  def label(path, _):  # By the leaf's top-level key (see methods/network.py).
    key = getattr(path[0], "key", None) if path else None
    return key if key in transforms else "main"

  return optax.multi_transform(
      transforms,
      lambda params: jax.tree_util.tree_map_with_path(label, params)), schedule
