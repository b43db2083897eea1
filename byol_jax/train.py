r"""Self-supervised pretraining: BYOL, SimSiam or SimCLR.

  python -m byol_jax.train --config=configs/byol_cifar10.py --workdir=/tmp/run
  python -m byol_jax.train --config=configs/byol_r50.py:epochs=1000 \
      --config.batch_size=4096 --workdir=gs://BUCKET/run

The same command runs on one CPU, a GPU box, a multi-node GPU cluster and a
Cloud TPU pod slice: on several hosts it joins JAX's multi-controller runtime
(`jax.distributed.initialize`), every host reads its own shard of the data and
all of them run this file. A run resumes from the newest checkpoint in
--workdir; SIGTERM (preemption) saves a checkpoint before exiting.
"""
import json
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from byol_jax import checkpoint
from byol_jax import data
from byol_jax import methods
from byol_jax import metric_writer
from byol_jax import multihost
from byol_jax import optim
from byol_jax import sharding
from byol_jax import step as step_lib
from byol_jax import train_state
from byol_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py[:ARG].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and "
                               "the resolved config go.")
_MULTIHOST = flags.DEFINE_enum(
    "multihost", "auto", ["auto", "yes", "no"],
    "Join jax.distributed: auto = when the environment says several hosts "
    "(Cloud TPU pod, SLURM with several tasks, JAX_COORDINATOR_ADDRESS).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (else auto-detect).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the job (else detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (else detected).")


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; nothing after it was saved."""


# Multi-host start-up lives in byol_jax/multihost.py; the old name stays for
# tests/multihost_worker.py.
initialize_distributed = multihost.initialize


# ---------------------------------------------------------------------------
# Config checks: one clear line per problem, before anything heavy runs.
# ---------------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Raises ConfigError for settings that cannot work."""
  methods.get(config.method)
  sharding.check_batch_size(config.batch_size, mesh)
  if config.model.depth not in (18, 34, 50, 101, 152, 200):
    raise ConfigError(f"model.depth={config.model.depth} is not a ResNet "
                      "depth; use 18, 34, 50, 101, 152 or 200.")
  if config.model.stem not in ("imagenet", "cifar"):
    raise ConfigError(f"model.stem={config.model.stem!r}; use 'imagenet' or "
                      "'cifar'.")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("Set config.num_epochs or config.total_steps > 0.")


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json; a different older one is kept, renamed."""
  if jax.process_index() != 0:
    return
  workdir = checkpoint.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "config.json"
  text = json.dumps(checkpoint.config_to_json(config), indent=2,
                    sort_keys=True)
  if path.exists():
    if path.read_text() == text:
      return
    path.rename(workdir / f"config.{int(time.time())}.json")
  path.write_text(text)


# ---------------------------------------------------------------------------
# Evaluation during and after training.
# ---------------------------------------------------------------------------
def evaluate(config, model, state, mesh) -> dict[str, float]:
  """Online classifier top-1 on the eval split, and the kNN monitor."""
  from byol_jax.evaluation import knn  # pylint: disable=g-import-not-at-top
  from byol_jax.evaluation import online  # pylint: disable=g-import-not-at-top
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  results = {}
  if config.data.num_classes:
    acc = online.classifier_accuracy(config, model, variables, mesh)
    results.update({f"eval/online_{k}": v for k, v in acc.items()})
  if config.knn.enabled:
    # Variables go in as an argument, not a closure: no recompilation per
    # evaluation and no weights baked into the program as constants.
    def encoder_apply(v, images):
      return model.apply(v, images, train=False, method=model.represent)
    acc = knn.knn_accuracy(config, encoder_apply, mesh, variables)
    results.update({f"eval/knn_{k}": v for k, v in acc.items()})
  return results


# ---------------------------------------------------------------------------
# The training run.
# ---------------------------------------------------------------------------
class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:  # jax.distributed handles it on pods.
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint before exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def check(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Trains (resuming from WORKDIR's newest checkpoint) and evaluates.

  Args:
    config: a resolved config (see byol_jax.config_lib).
    workdir: the run's directory.

  Returns:
    The final metrics (train metrics of the last step and eval results).
  """
  # --- Mesh and config checks.
  mesh = sharding.make_mesh()
  validate_config(config, mesh)
  _write_config(workdir, config)
  method = methods.get(config.method)
  model = method.make_network(config)

  # --- Checkpoints and data. The data pipeline starts at the step of the
  # newest checkpoint; if that one is damaged it is rebuilt below.
  ckpt = checkpoint.Checkpointer(workdir, config)
  start_step = ckpt.latest_step() or 0
  pretrain = data.build_pretrain(config, mesh, start_step=start_step)
  steps_per_epoch = max(
      (config.num_train_examples or pretrain.num_examples)
      // config.batch_size, 1)
  total_steps = config.total_steps or config.num_epochs * steps_per_epoch

  # --- Optimizer, schedules, state.
  tx, lr_fn = optim.build_optimizer(config, total_steps, steps_per_epoch)
  tau_fn = (optim.tau_schedule(config.tau_base, total_steps)
            if method.HAS_TARGET else None)
  abstract = train_state.abstract(config, model, tx, mesh, method.HAS_TARGET)
  state = ckpt.restore(abstract)
  if state is None:
    state = train_state.create(config, model, tx, mesh, method.HAS_TARGET)
  step = int(jax.device_get(state.step))
  if step != start_step:
    logging.warning("Resuming from step %d, not %d: rebuilding the input "
                    "pipeline there.", step, start_step)
    pretrain = data.build_pretrain(config, mesh, start_step=step)
  logging.info("%s from step %d of %d (%d steps per epoch, global batch %d, "
               "%d devices).", "Resuming" if step else "Starting", step,
               total_steps, steps_per_epoch, config.batch_size,
               jax.device_count())

  # --- The compiled step.
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(config, model, tx, lr_fn, tau_fn), mesh)

  # --- The loop.
  writer = metric_writer.MetricWriter(workdir)
  final: dict[str, Any] = {}
  last_log_time, last_log_step = time.monotonic(), step
  metrics = previous = None
  with _Preemption() as preemption:
    while step < total_steps:
      state, metrics = train_step(state, pretrain.batch(step))
      step += 1
      # Run at most one step ahead of the devices: enough to keep them busy,
      # and XLA:CPU's simulated devices can deadlock with deep queues.
      if previous is not None:
        jax.block_until_ready(previous)
      previous = metrics
      logged = step % config.log_every_steps == 0 or step == total_steps
      if logged:
        host = _checked(jax.device_get(metrics), step)
        now = time.monotonic()
        rate = (step - last_log_step) * config.batch_size / (now - last_log_time)
        host["images_per_sec"] = rate
        host["epoch"] = step / steps_per_epoch
        eta = (total_steps - step) * config.batch_size / max(rate, 1e-9)
        last_log_time, last_log_step = now, step
        writer.write(step, host)
        final.update(host)
        if jax.process_index() == 0:
          print(f"step {step}/{total_steps} ep {host['epoch']:.2f} "
                f"loss {host['loss']:.4f} lr {host['lr']:.4g} "
                f"tau {host.get('tau', float('nan')):.5f} "
                f"cls_acc {host['classifier_accuracy']:.3f} "
                f"emb_std {host['embedding_std']:.4f} "
                f"img/s {rate:.1f} eta {_format_eta(eta)}", flush=True)
      if preemption.check(step):
        _checked(jax.device_get(metrics), step)
        ckpt.save(step, state)
        ckpt.close()
        writer.close()
        logging.warning("Saved step %d after SIGTERM; exiting.", step)
        final["preempted_at"] = step
        return final
      if ckpt.due(step) and step < total_steps:
        if not logged:  # Never save a state whose loss is not finite.
          _checked(jax.device_get(metrics), step)
        ckpt.save(step, state)
      if (config.eval_every_steps and step % config.eval_every_steps == 0
          and step < total_steps):
        results = evaluate(config, model, state, mesh)
        writer.write(step, results)
        _print_eval(step, results)

  # --- The end: a final checkpoint and evaluation.
  if metrics is not None:
    _checked(jax.device_get(metrics), step)
  ckpt.save(step, state)
  results = evaluate(config, model, state, mesh)
  writer.write(step, results)
  _print_eval(step, results)
  final.update(results)
  final["step"] = step
  ckpt.close()
  writer.close()
  return final


def _checked(host_metrics: dict, step: int) -> dict:
  """Raises NonFiniteLossError if the loss is NaN or infinite."""
  host_metrics = {k: float(v) for k, v in host_metrics.items()}
  if not np.isfinite(host_metrics["loss"]):
    raise NonFiniteLossError(
        f"The loss is {host_metrics['loss']} at step {step}; stopping. The "
        "last checkpoint before it is kept as it was. Lower "
        "config.optimizer.base_lr or check the data.")
  return host_metrics


def _print_eval(step: int, results: dict) -> None:
  if results and jax.process_index() == 0:
    text = " ".join(f"{k} {v:.4f}" for k, v in sorted(results.items()))
    print(f"step {step} {text}", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: give --config=configs/NAME.py[:ARG] and --workdir=DIR.",
          file=sys.stderr)
    sys.exit(2)
  initialize_distributed(_MULTIHOST.value, _COORDINATOR.value,
                         _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
