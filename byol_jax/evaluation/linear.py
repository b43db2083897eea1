"""Linear evaluation and fine-tuning of a pretrained encoder.

The protocol of DESIGN section 3: a fresh linear layer on the frozen encoder
(batch norm in inference mode, i.e. its running averages), SGD with Nesterov
momentum 0.9, lr = base_lr * batch / 256 with cosine decay to 0, no weight
decay, random crop + flip as the only augmentation; then top-1 and top-5 on
the centre-cropped eval split.

The frozen encoder runs inside the jitted train step on every (freshly
augmented) batch under stop-gradient; only the head's parameters are in the
optimizer. With `finetune=True` the encoder trains too (batch norm in train
mode over the global batch) and the fine-tuned variables are returned.
"""
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from byol_jax import sharding
from byol_jax.errors import ConfigError
from byol_jax.evaluation import knn
from byol_jax.evaluation import online


@flax.struct.dataclass
class LinearState:
  """The state of the linear (or fine-tuning) run, replicated and donated.

  Attributes:
    step: optimizer steps taken, int32 scalar.
    params: {'head': Dense params} and, when fine-tuning, 'encoder'.
    batch_stats: the encoder's batch-norm averages when fine-tuning, else {}.
    opt_state: the optimizer state of `params`.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState


def make_head(num_classes: int) -> nn.Module:
  """The fresh linear classifier: Dense(num_classes), zero-initialised."""
  return nn.Dense(num_classes, kernel_init=nn.initializers.zeros,
                  dtype=jnp.float32, name="head")


def make_optimizer(base_lr: float, batch_size: int, total_steps: int, *,
                   weight_decay: float = 0.0, momentum: float = 0.9
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD, Nesterov momentum, lr = base_lr * batch / 256 cosine-decayed to 0.

  Weight decay (off by default, as in the protocol) applies to kernels only.

  Returns:
    (the optimizer, its learning-rate schedule).
  """
  peak = base_lr * batch_size / 256.0
  schedule = optax.cosine_decay_schedule(peak, max(total_steps, 1))
  tx = optax.sgd(schedule, momentum=momentum, nesterov=True)
  if weight_decay:
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask), tx)
  return tx, schedule


def _cross_entropy(logits: jax.Array, labels: jax.Array,
                   weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and top-1 accuracy over rows of weight 1."""
  logits = logits.astype(jnp.float32)  # [B, C]
  ce = optax.losses.softmax_cross_entropy_with_integer_labels(
      logits, jnp.maximum(labels, 0))  # [B]
  count = jnp.maximum(jnp.sum(weights), 1.0)
  acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(ce * weights) / count, jnp.sum(acc * weights) / count


def make_train_step(encoder: nn.Module, head: nn.Module,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, finetune: bool, normalize: bool = True):
  """The (unjitted) step `(state, frozen, batch) -> (state, metrics)`.

  Args:
    encoder: the encoder module, `encoder.apply(vars, x, train=...) -> [B, D]`.
    head: the linear layer.
    tx: the optimizer of `state.params`.
    schedule: its learning rate, for the metrics.
    finetune: train the encoder too (BN in train mode); otherwise `frozen`
      holds the encoder's {'params', 'batch_stats'}, used in inference mode
      under stop-gradient.
    normalize: apply the ImageNet mean/std to the [0, 1] images.
  """
  def train_step(state: LinearState, frozen: Any, batch: dict):
    x = knn.to_float_images(batch["image"])  # [B, S, S, 3] in [0, 1]
    if normalize:
      x = knn.normalize_images(x)
    labels = batch["label"].astype(jnp.int32)  # [B]
    weights = (labels >= 0).astype(jnp.float32)
    if "mask" in batch:
      weights = weights * batch["mask"].astype(jnp.float32)

    if finetune:
      def loss_fn(params):
        y, updates = encoder.apply(
            {"params": params["encoder"], "batch_stats": state.batch_stats},
            x, train=True, mutable=["batch_stats"])  # [B, D]
        logits = head.apply({"params": params["head"]},
                            y.astype(jnp.float32))  # [B, C]
        loss, acc = _cross_entropy(logits, labels, weights)
        return loss, (acc, updates["batch_stats"])
    else:
      y = encoder.apply(frozen, x, train=False)  # [B, D]
      y = jax.lax.stop_gradient(y.astype(jnp.float32))

      def loss_fn(params):
        logits = head.apply({"params": params["head"]}, y)  # [B, C]
        loss, acc = _cross_entropy(logits, labels, weights)
        return loss, (acc, state.batch_stats)

    (loss, (acc, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, accuracy=acc,
                   lr=jnp.asarray(schedule(state.step), jnp.float32))
    return state.replace(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state), metrics

  return train_step


def jit_train_step(train_step, mesh: Mesh):
  """Batch sharded on `data`; state and frozen encoder replicated; state donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(rep, rep, sharding.batch_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def _feature_dim(encoder: nn.Module, variables: Any, image_size: int) -> int:
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: encoder.apply(v, x, train=False),
                       variables, dummy)
  return int(out.shape[-1])


def linear_eval(config: ml_collections.ConfigDict, encoder: nn.Module,
                variables: Any, mesh: Mesh, *, epochs: float = 80,
                batch_size: int = 256, base_lr: float = 0.2,
                finetune: bool = False, weight_decay: float = 0.0,
                log_every: int = 0, seed: int = 0, steps: int = 0,
                eval_batch_size: int | None = None) -> dict[str, Any]:
  """Trains a linear classifier on the encoder and scores it on the eval split.

  Args:
    config: the pretraining run's config (data.*, augment.normalize).
    encoder: the encoder module (e.g. from `checkpoint.load_encoder`).
    variables: its {'params', 'batch_stats'}.
    mesh: the device mesh.
    epochs: passes over config.data.train_split (the protocol: 80).
    batch_size: global batch; lr = base_lr * batch_size / 256.
    base_lr: the learning rate at batch 256 (0.2 for the linear protocol; use
      a smaller one, e.g. 0.01, to fine-tune).
    finetune: also train the encoder (BN in train mode).
    weight_decay: on kernels; 0 in the protocol.
    log_every: log train loss/accuracy every this many steps (0: each epoch).
    seed: head initialisation and data order.
    steps: when > 0, the number of steps, overriding `epochs`.
    eval_batch_size: global eval batch (default: `batch_size`).

  Returns:
    {'top1', 'top5' (fractions), 'epochs', 'steps', 'steps_per_epoch',
    'batch_size', 'base_lr', 'lr', 'finetune', 'num_train_examples',
    'num_eval_examples', 'train_loss', 'train_accuracy' (the last logging
    window), 'train_seconds', 'head': the trained Dense params} and, when
    fine-tuning, 'variables': the encoder's fine-tuned
    {'params', 'batch_stats'}.
  """
  from byol_jax import data  # pylint: disable=g-import-not-at-top
  sharding.check_batch_size(batch_size, mesh)
  eval_batch_size = int(eval_batch_size or batch_size)
  sharding.check_batch_size(eval_batch_size, mesh)
  num_classes = int(config.data.num_classes)
  if num_classes <= 0:
    raise ConfigError("Linear evaluation needs labels: config.data.num_classes "
                      f"is {num_classes}.")
  normalize = bool(config.augment.get("normalize", True))

  train_data = data.build_linear_train(config, mesh, batch_size, seed)
  steps_per_epoch = max(1, int(train_data.num_examples) // batch_size)
  total_steps = int(steps) if steps > 0 else max(
      1, int(round(epochs * steps_per_epoch)))
  log_every = int(log_every) or steps_per_epoch

  head = make_head(num_classes)
  tx, schedule = make_optimizer(base_lr, batch_size, total_steps,
                                weight_decay=weight_decay)
  rep = sharding.replicated(mesh)
  variables = jax.device_put(
      {"params": variables["params"],
       "batch_stats": variables.get("batch_stats", {})}, rep)
  dim = _feature_dim(encoder, variables, int(config.data.image_size))

  def init(key, variables):
    params = {"head": head.init(key, jnp.zeros((1, dim)))["params"]}
    batch_stats = {}
    if finetune:  # Copies: the donated state must not alias the caller's.
      params["encoder"] = jax.tree.map(jnp.copy, variables["params"])
      batch_stats = jax.tree.map(jnp.copy, variables["batch_stats"])
    return LinearState(step=jnp.zeros((), jnp.int32), params=params,
                       batch_stats=batch_stats, opt_state=tx.init(params))

  key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  state = jax.jit(init, out_shardings=rep)(key, variables)
  frozen = None if finetune else variables
  step_fn = jit_train_step(
      make_train_step(encoder, head, tx, schedule, finetune=finetune,
                      normalize=normalize), mesh)

  logging.info("Linear %s: %d steps (%d per epoch) of batch %d, peak lr %.4g.",
               "fine-tuning" if finetune else "evaluation", total_steps,
               steps_per_epoch, batch_size, base_lr * batch_size / 256)
  start = time.time()
  window = []  # Metrics of the steps since the last log, on device.
  last = dict(loss=float("nan"), accuracy=float("nan"))
  for step in range(total_steps):
    batch = knn.as_global(train_data.batch(step), mesh)
    state, metrics = step_fn(state, frozen, batch)
    if window:
      # At most two steps in flight: deep run-ahead gains nothing here and
      # can deadlock the collectives of multi-device CPU runs.
      jax.block_until_ready(window[-1])
    window.append(metrics)
    if (step + 1) % log_every == 0 or step + 1 == total_steps:
      host = {k: float(np.mean([knn.to_host(m[k]) for m in window]))
              for k in window[0]}
      last = host
      logging.info("linear step %d/%d (epoch %.2f): loss %.4f acc %.4f "
                   "lr %.4g", step + 1, total_steps,
                   (step + 1) / steps_per_epoch, host["loss"],
                   host["accuracy"], host["lr"])
      if not np.isfinite(host["loss"]):
        raise FloatingPointError(
            f"Linear evaluation diverged at step {step + 1} (loss "
            f"{host['loss']}); lower --base_lr.")
      window = []
  train_seconds = time.time() - start

  if finetune:
    enc_vars = {"params": state.params["encoder"],
                "batch_stats": state.batch_stats}
  else:
    enc_vars = variables

  def logits_fn(v, x):
    y = encoder.apply(v["encoder"], x, train=False)  # [B, D]
    return head.apply({"params": v["head"]}, y.astype(jnp.float32))

  eval_step = online.make_eval_step(logits_fn, mesh, normalize=normalize)
  eval_data = data.build_eval(config, mesh, config.data.eval_split,
                              eval_batch_size)
  acc = online.evaluate(eval_step, {"encoder": enc_vars,
                                    "head": state.params["head"]},
                        eval_data, mesh)
  result = dict(
      top1=acc["top1"], top5=acc["top5"],
      epochs=total_steps / steps_per_epoch, steps=total_steps,
      steps_per_epoch=steps_per_epoch, batch_size=batch_size,
      base_lr=base_lr, lr=base_lr * batch_size / 256.0, finetune=finetune,
      weight_decay=weight_decay,
      num_train_examples=int(train_data.num_examples),
      num_eval_examples=acc["num_examples"], train_loss=last["loss"],
      train_accuracy=last["accuracy"], train_seconds=train_seconds,
      head=state.params["head"])
  if finetune:
    result["variables"] = enc_vars
  return result
