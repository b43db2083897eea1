"""Linear evaluation and fine-tuning of a pretrained encoder.

DESIGN section 3: a fresh linear layer on the frozen encoder (batch norm in
inference mode), SGD with Nesterov momentum 0.9, lr = base_lr * batch / 256
cosine-decayed to 0, no weight decay, random crop + flip; then top-1 and
top-5 on the centre-cropped eval split. The frozen encoder runs in the jitted
step under stop-gradient. With `finetune=True` the encoder trains too (batch
norm in train mode) and the fine-tuned variables are returned.
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

from byol_jax import data
from byol_jax import progress
from byol_jax.core import models
from byol_jax.core import sharding
from byol_jax.data import augment
from byol_jax.errors import ConfigError
from byol_jax.evaluation import monitor
from byol_jax.evaluation import online


@flax.struct.dataclass
class LinearState:
  """The replicated, donated state; params {'head'} (+ 'encoder': fine-tune)."""
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
  """(SGD with Nesterov momentum, its lr schedule) for the protocol.

  lr = base_lr * batch / 256 cosine-decayed to 0; weight decay (off in the
  protocol) applies to kernels only.
  """
  peak = base_lr * batch_size / 256.0
  schedule = optax.cosine_decay_schedule(peak, max(total_steps, 1))
  tx = optax.sgd(schedule, momentum=momentum, nesterov=True)
  if weight_decay:
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask), tx)
  return tx, schedule


def make_train_step(encoder: nn.Module, head: nn.Module,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, finetune: bool, normalize: bool = True):
  """The (unjitted) step `(state, frozen, batch) -> (state, metrics)`.

  Without `finetune`, `frozen` is the encoder's {'params', 'batch_stats'},
  run in inference mode; `normalize` applies the ImageNet mean/std.
  """
  def train_step(state: LinearState, frozen: Any, batch: dict):
    x = augment.to_float(batch["image"])  # [B, S, S, 3] in [0, 1]
    x = augment.normalize(x) if normalize else x
    labels = batch["label"].astype(jnp.int32)  # [B]
    weights = (labels >= 0).astype(jnp.float32)
    if "mask" in batch:
      weights = weights * batch["mask"].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    frozen_y = None if finetune else jax.lax.stop_gradient(
        encoder.apply(frozen, x, train=False))  # [B, D]

    def loss_fn(params):
      y, batch_stats = frozen_y, state.batch_stats
      if finetune:
        y, updates = encoder.apply(
            {"params": params["encoder"], "batch_stats": batch_stats},
            x, train=True, mutable=["batch_stats"])  # [B, D]
        batch_stats = updates["batch_stats"]
      logits = head.apply({"params": params["head"]},
                          y.astype(jnp.float32))  # [B, C]
      ce = optax.losses.softmax_cross_entropy_with_integer_labels(
          logits, jnp.maximum(labels, 0))  # [B]
      acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
      return (jnp.sum(ce * weights) / count,
              (jnp.sum(acc * weights) / count, batch_stats))

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
  """Jits the step: batch on `data`, the rest replicated, state donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(rep, rep, sharding.batch_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def _fetch(tree: Any) -> Any:
  """The training loop's only device-to-host read (at log steps)."""
  return jax.device_get(tree)


class LinearEvaluator:
  """Trains a linear classifier (or fine-tunes) on an encoder and scores it.

  Built once; each call trains a fresh head and compiles nothing new.
  """

  def __init__(self, config: ml_collections.ConfigDict, encoder: nn.Module,
               mesh: Mesh, *, epochs: float = 80, steps: int = 0,
               batch_size: int = 256, eval_batch_size: int | None = None,
               base_lr: float = 0.2, finetune: bool = False,
               weight_decay: float = 0.0, seed: int = 0,
               train_split: str | None = None, fraction: float = 1.0,
               log_every: int = 0):
    """Builds the evaluation.

    Args:
      config, encoder, mesh: the run's config, the encoder module (e.g. of
        `byol_jax.load_encoder`), the device mesh.
      epochs: passes over the labelled data; `steps` > 0 overrides it.
      batch_size: global batch, rounded up to the device count (and down
        to the labelled data); the lr follows it.
      base_lr: the learning rate at batch 256 (0.2 for the linear protocol;
        smaller, e.g. 0.01, to fine-tune).
      seed: head initialisation, data order and the labelled subset.
      train_split, fraction: the labelled split (default the config's) and
        the seeded fraction of it (the paper's 1% and 10% fine-tuning).
      log_every: steps between logs of train loss/accuracy (0: each epoch).
    """
    if config.data.num_classes < 0 or not config.data.eval_split:
      config = data.resolve(config)  # Classes and eval split from the data.
    num_classes = int(config.data.num_classes)
    if num_classes <= 0:
      raise ConfigError("Linear evaluation needs labels: the data has none "
                        f"(config.data.num_classes={num_classes}).")
    asked = batch_size
    batch_size = sharding.fit_batch_size(batch_size, mesh)
    eval_batch_size = sharding.fit_batch_size(eval_batch_size or batch_size,
                                              mesh)
    if batch_size != asked:
      progress.say(f"Linear evaluation: batch {batch_size} instead of {asked} "
                   f"(a multiple of the {mesh.devices.size} devices); the "
                   "learning rate follows it.")
    train = lambda b: data.build_linear_train(  # noqa: E731
        config, mesh, b, seed, split=train_split, fraction=fraction)
    evals = lambda b: data.build_eval(  # noqa: E731
        config, mesh, config.data.eval_split, b)
    self.train_data, self.eval_data = train(batch_size), evals(eval_batch_size)
    fitted = fit_to_data(batch_size, eval_batch_size,
                         self.train_data.num_examples,
                         self.eval_data.num_examples, mesh.devices.size)
    if fitted[0] != batch_size:
      self.train_data = train(fitted[0])
    if fitted[1] != eval_batch_size:
      self.eval_data = evals(fitted[1])
    batch_size, eval_batch_size = fitted
    self.steps_per_epoch = max(1, int(self.train_data.num_examples)
                               // batch_size)
    self.total_steps = int(steps) if steps > 0 else max(
        1, int(round(epochs * self.steps_per_epoch)))
    self.log_every = int(log_every) or self.steps_per_epoch
    self.settings = dict(
        batch_size=batch_size, eval_batch_size=eval_batch_size,
        base_lr=base_lr, lr=base_lr * batch_size / 256.0, finetune=finetune,
        weight_decay=weight_decay, steps=self.total_steps,
        steps_per_epoch=self.steps_per_epoch,
        epochs=self.total_steps / self.steps_per_epoch, seed=seed,
        fraction=fraction,
        train_split=train_split or config.data.train_split,
        num_train_examples=int(self.train_data.num_examples))
    self._mesh, self._finetune, self._seed = mesh, finetune, seed
    dim = models.representation_dim(config.model.depth, config.model.width,
                                    config.model.num_filters)
    head = make_head(num_classes)
    tx, schedule = make_optimizer(base_lr, batch_size, self.total_steps,
                                  weight_decay=weight_decay)
    rep = sharding.replicated(mesh)

    def init(key, variables):
      params = {"head": head.init(key, jnp.zeros((1, dim)))["params"]}
      batch_stats = {}
      if finetune:  # Copies: the donated state must not alias the caller's.
        params["encoder"] = jax.tree.map(jnp.copy, variables["params"])
        batch_stats = jax.tree.map(jnp.copy, variables["batch_stats"])
      return LinearState(step=jnp.zeros((), jnp.int32), params=params,
                         batch_stats=batch_stats, opt_state=tx.init(params))

    self._init = jax.jit(init, out_shardings=rep)
    self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b),
                        out_shardings=rep)
    self._step = jit_train_step(
        make_train_step(encoder, head, tx, schedule, finetune=finetune,
                        normalize=config.augment.get("normalize", True)), mesh)
    forward = monitor.forward_fn(config, mesh, encoder)
    self._count = lambda v, batch: forward(v["encoder"], v["head"], batch)[1]

  def __call__(self, variables: Any) -> dict[str, Any]:
    """Trains a fresh head on `variables` ({'params', 'batch_stats'}).

    Returns:
      The settings and 'top1', 'top5', 'num_eval_examples', 'train_loss',
      'train_accuracy' (the last logging window), 'train_seconds', 'head'
      (Dense params) and, when fine-tuning, the tuned 'variables'.
    """
    variables = jax.device_put(
        {"params": variables["params"],
         "batch_stats": variables.get("batch_stats", {})},
        sharding.replicated(self._mesh))
    key = jax.random.fold_in(jax.random.PRNGKey(self._seed), 1)
    state = self._init(key, variables)
    frozen = None if self._finetune else variables
    what = "fine-tuning" if self._finetune else "linear evaluation"
    logging.info("%s: %d steps (%d per epoch) of batch %d, peak lr %.4g.",
                 what, self.total_steps, self.steps_per_epoch,
                 self.settings["batch_size"], self.settings["lr"])
    start = time.time()
    ticker = progress.Ticker(what, self.total_steps, "steps")
    # Sums of the metrics since the last log, on device: the loop reads
    # from the devices only at log steps, once.
    window, window_steps, previous = None, 0, None
    last = dict(loss=float("nan"), accuracy=float("nan"))
    throttle = jax.default_backend() == "cpu"
    for step in range(self.total_steps):
      state, metrics = self._step(state, frozen, self.train_data.batch(step))
      if throttle and previous is not None:
        # XLA:CPU's simulated devices can deadlock with deep queues.
        jax.block_until_ready(previous)
      previous = metrics
      window = metrics if window is None else self._add(window, metrics)
      window_steps += 1
      if (step + 1) % self.log_every == 0 or step + 1 == self.total_steps:
        host = {k: float(v) / window_steps
                for k, v in _fetch(window).items()}
        last, window, window_steps = host, None, 0
        logging.info("linear step %d/%d: loss %.4f acc %.4f lr %.4g",
                     step + 1, self.total_steps, host["loss"],
                     host["accuracy"], host["lr"])
        if not np.isfinite(host["loss"]):
          raise FloatingPointError(
              f"Linear evaluation diverged at step {step + 1} (loss "
              f"{host['loss']}); lower --base_lr.")
      ticker.tick(step + 1, f"loss {last['loss']:.4f} acc "
                  f"{last['accuracy']:.3f}")
    train_seconds = time.time() - start
    enc_vars = ({"params": state.params["encoder"],
                 "batch_stats": state.batch_stats}
                if self._finetune else variables)
    acc = online.evaluate(
        self._count, {"encoder": enc_vars, "head": state.params["head"]},
        progress.track(self.eval_data, f"scoring on "
                       f"{self.eval_data.num_examples} images",
                       len(self.eval_data)), self._mesh)
    result = dict(self.settings, top1=acc["top1"], top5=acc["top5"],
                  num_eval_examples=acc["num_examples"],
                  train_loss=last["loss"], train_accuracy=last["accuracy"],
                  train_seconds=train_seconds, head=state.params["head"])
    if self._finetune:
      result["variables"] = enc_vars
    return result


def fit_to_data(batch_size: int, eval_batch_size: int, num_train: int,
                num_eval: int, num_devices: int) -> tuple[int, int]:
  """(train, eval) batches no larger than the data, multiples of the devices.

  The train batch rounds down (and says so; e.g. the 1% fine-tuning's 4096
  on a few hundred images), the eval batch up to pad less.
  """
  def fit(b, n, up):  # n rounded up or down to the devices, if under b.
    if n >= b:
      return b
    return max((-(-n // num_devices) if up else n // num_devices)
               * num_devices, num_devices)
  train_b = fit(batch_size, num_train, False)
  eval_b = fit(eval_batch_size, num_eval, True)
  if train_b != batch_size:
    progress.say(f"Linear evaluation: batch {train_b} instead of "
                 f"{batch_size}, the {num_train} labelled images (a "
                 f"multiple of the {num_devices} devices); the learning rate "
                 "follows it.")
  return train_b, eval_b
