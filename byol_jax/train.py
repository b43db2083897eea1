r"""Self-supervised pretraining: BYOL, SimSiam or SimCLR.

  python -m byol_jax.train --config=configs/byol_cifar10.py --workdir=/tmp/run
  python -m byol_jax.train --config=configs/byol_r50.py:epochs=1000 \
      --config.batch_size=4096 --workdir=gs://BUCKET/run

The same command runs on one CPU, a GPU box, a multi-node GPU cluster and a
Cloud TPU pod slice: on several hosts it joins JAX's multi-controller runtime,
every host reads its own shard of the data and all of them run this file.
Running it again resumes. Exit codes: 0 done, 1 an error (one `error:` line),
2 a bad command line, 130 Ctrl-C, 143 preempted after saving.
"""
import contextlib
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from byol_jax import data
from byol_jax import prepare
from byol_jax import progress
from byol_jax import storage
from byol_jax.core import methods
from byol_jax.core import optim
from byol_jax.core import sharding
from byol_jax.core import step as step_lib
from byol_jax.core import train_state
from byol_jax.errors import ConfigError
from byol_jax.evaluation import monitor as monitor_lib
from byol_jax.trainer import checkpoint
from byol_jax.trainer import cli
from byol_jax.trainer import divergence
from byol_jax.trainer import job_errors
from byol_jax.trainer import lock as lock_lib
from byol_jax.trainer import metric_writer
from byol_jax.trainer import preempt
from byol_jax.trainer import resume
from byol_jax.trainer import validate


class NonFiniteError(RuntimeError):
  """The state became NaN/Inf; `flags` resume at a lower learning rate."""

  def __init__(self, message: str, flags: list[str]):
    super().__init__(message)
    self.flags = flags


def _fetch(tree):
  """The loop's only device-to-host read (at log and save steps)."""
  return jax.device_get(tree)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       restore_step: int | None = None,
                       allow_changes: tuple[str, ...] = (),
                       start_over: bool = False,
                       profile_steps: tuple[int, int] | None = None
                       ) -> dict[str, Any]:
  """Trains (resuming from WORKDIR's newest checkpoint) and evaluates.

  `restore_step`, `allow_changes`, `start_over` are the flags';
  `profile_steps` (A, B) traces steps A to B - 1.

  Returns:
    The last logged metrics, eval results, 'step' ('preempted' if SIGTERM).
  """
  say = progress.say
  storage.check(workdir)
  storage.check(config.data.get("data_dir") or "", "--config.data.data_dir")
  # --- Config and data: checked before anything is compiled.
  mesh = sharding.make_mesh()
  prepare.ensure_prepared(config.data)
  info = data.describe(config)
  config = data.resolve(config, info)
  validate.check(config, mesh)
  method = methods.get(config.method)
  model = method.make_network(config)
  # As the official code counts: epochs * N // B, warm-up likewise.
  total_steps, warmup_steps, steps_per_epoch = optim.schedule_steps(
      config, config.num_train_examples or info.num_train)
  workdir = checkpoint.as_path(workdir)
  if profile_steps and profile_steps[1] > total_steps:
    raise ConfigError(f"--profile_steps={profile_steps[0]}:{profile_steps[1]}"
                      f" ends past the run's {total_steps} steps.")
  say(progress.describe_run(config, info.name, total_steps, steps_per_epoch,
                            workdir))
  if not config.data.num_classes:
    say(f"{info.name} has no labels: the online classifier and the kNN "
        "monitor are off.")
  elif not config.data.eval_split:
    say(f"{info.name} has no eval split: evaluations are off.")
  if config.data.num_classes == 1:
    say(progress.single_class_warning(info.name))

  with contextlib.ExitStack() as stack:
    # SIGTERM while the main thread is busy in one long call (waiting for
    # the lock, restoring, compiling, evaluating) ends the run at once.
    guard = stack.enter_context(preempt.Guard())
    lock = lock_lib.WorkdirLock(workdir)
    with guard.busy("waiting for the workdir lock"):
      lock.acquire()
    stack.callback(lock.release)  # Released last, after the saves finish.
    guard.on_exit(lock.release)
    job_errors.announce_lock(str(lock.path), lock.token)

    # --- Optimizer and schedules.
    tx, lr_fn = optim.build_optimizer(config, total_steps, steps_per_epoch,
                                      warmup_steps)
    tau_fn = (optim.tau_schedule(config.tau_base, total_steps)
              if method.HAS_TARGET else None)

    # --- Restore or initialise: decided once, before the data is built.
    ckpt = stack.enter_context(checkpoint.Checkpointer(
        workdir, config, stop_requested=lambda: guard.requested))
    guard.on_exit(ckpt.wait)
    guard.saves_with(lambda s, st: (ckpt.save(s, st), ckpt.wait()))
    abstract = train_state.abstract(config, model, tx, mesh, method.HAS_TARGET)
    with guard.busy("restoring"):
      state, step = resume.restore_or_init(
          ckpt, config, abstract,
          lambda: train_state.create(config, model, tx, mesh,
                                     method.HAS_TARGET),
          restore_step, say=say, allow=tuple(allow_changes),
          start_over=start_over)
    saved_step = step  # The newest state on disk (the restored one).
    try:
      checkpoint.write_config(workdir, config)
    except OSError as e:  # A full disk: one line, as for any other write.
      raise checkpoint.StorageError(
          f"Writing {workdir}/config.json failed ({e}); free space or fix "
          "the storage, then run the same command again.") from e
    say(f"Resuming from step {step}." if step else "Starting from step 0.")

    # --- Data, built once at the start step; evaluators, built once.
    with guard.busy("starting the data pipeline"):
      pipeline = data.build_pretrain(config, mesh, start_step=step)
      monitor = monitor_lib.Monitor(config, mesh)
    evaluate = monitor.enabled

    # --- The compiled step.
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(config, model, tx, lr_fn, tau_fn), mesh)

    # --- The loop reads from the devices only to log, save or evaluate.
    writer = stack.enter_context(metric_writer.MetricWriter(workdir))
    guard.on_exit(writer.close)
    health = divergence.Health(workdir)  # Norms, for advice after a NaN.
    if 0 not in health.norms:  # Logged at the start (or recalled, if not).
      health.norms[0] = divergence.param_norm(state.params)
      if step == 0:
        writer.write(0, {"param_norm": health.norms[0]})
    # Elapsed time goes on from earlier starts.
    elapsed = metric_writer.logged(workdir, "elapsed_seconds") if step else []
    meter = progress.Progress(step, total_steps, config.batch_size,
                              elapsed[-1][1] if elapsed else 0.0)
    # XLA:CPU's simulated devices can deadlock with a deep queue of
    # collectives: there, run at most one step ahead.
    throttle = jax.default_backend() == "cpu"
    final: dict[str, Any] = {}
    metrics = previous = tracing = None  # tracing: the first step traced.
    while step < total_steps:
      first = metrics is None
      if first:
        say("Compiling the train step (the first step takes longer).")
      if profile_steps and (step == max(profile_steps[0], meter.start_step)
                            < profile_steps[1]):
        jax.profiler.start_trace(str(workdir))  # In plugins/profile/.
        tracing = step
      with (guard.busy("compiling the train step") if first
            else contextlib.nullcontext()):
        with jax.transfer_guard("disallow"):
          state, metrics = train_step(state, pipeline.batch(step))
        if first:
          jax.block_until_ready(metrics)  # Once: compilation ends here.
          meter.first_step_done(step + 1)
      step += 1
      if throttle:  # At the first step previous is None: a no-op.
        jax.block_until_ready(previous)
      previous = metrics
      if tracing is not None and step == profile_steps[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        say(f"Profiled steps {tracing}-{step - 1}: {workdir}/plugins/profile")
      host = None
      if step % config.log_every_steps == 0 or step == total_steps:
        host = _checked(_fetch(metrics), step, ckpt, config, health)
        ckpt.say_committed(say)
        host.update(epoch=step / steps_per_epoch, **meter.times(step))
        _check_decoding(config, pipeline, host, step, meter)
        writer.write(step, host)
        final.update(host)
        say(meter.line(step, host))
      if step < total_steps and ckpt.should_save(step):
        if host is None:  # Its norm, for the advice after a NaN stop.
          host = _checked(_fetch(metrics), step, ckpt, config, health)
          writer.write(step, {"param_norm": host["param_norm"]})
        ckpt.save(step, state)
        saved_step = step
        ckpt.say_committed(say)
        if ckpt.preempted:
          ckpt.wait()
          ckpt.say_committed(say)
          say(f"Preempted: saved step {step}; run the same command to "
              "resume.")
          return dict(final, step=step, preempted=True)
      if (evaluate and config.eval_every_steps and step < total_steps and
          step % config.eval_every_steps == 0):
        with guard.busy("evaluating", newer=(
            (step, state) if step > saved_step else None)):
          results = _evaluate(monitor, state)
        writer.write(step, results)
        say(progress.eval_line(step, results))

    # --- The end: a final checkpoint and evaluation.
    ckpt.save(step, state)
    ckpt.wait()
    ckpt.say_committed(say)
    if evaluate:
      with guard.busy("evaluating"):
        results = _evaluate(monitor, state)
      writer.write(step, results)
      say(progress.eval_line(step, results))
      final.update(results)
    final["step"] = step
    say(meter.summary(step, final))
    return final


def _evaluate(monitor: monitor_lib.Monitor, state) -> dict[str, float]:
  """The monitor on the online network (and BYOL's target, for kNN)."""
  variables = {"params": state.params["encoder"],
               "batch_stats": state.batch_stats["encoder"]}
  results = monitor(variables, state.params.get("classifier"))
  if state.target is not None and monitor.knn_on_target:
    target = {"params": state.target["params"]["encoder"],
              "batch_stats": state.target["batch_stats"]["encoder"]}
    results.update(monitor(target, None, prefix="eval/target_"))
  return results


def _check_decoding(config, pipeline, host: dict, step: int,
                    meter: progress.Progress) -> None:
  """Counts images that failed to decode (and were replaced) in `host`."""
  bad = pipeline.failed_images(step)
  if not bad:
    return
  host["undecodable_images"] = bad
  read = (step - meter.start_step) * config.batch_size
  limit = config.data.max_undecodable_fraction
  if bad > limit * read:
    raise ConfigError(
        f"{bad} of the {read} images read since step {meter.start_step} "
        f"failed to decode (more than data.max_undecodable_fraction={limit})"
        f"; check or replace the files under {config.data.path or 'the data'}"
        ", or raise --config.data.max_undecodable_fraction, and run the same "
        "command again to resume.")


def _checked(host_metrics: dict, step: int, ckpt: checkpoint.Checkpointer,
             config: ml_collections.ConfigDict,
             health: divergence.Health) -> dict:
  """Floats of the fetched metrics; raises NonFiniteError on NaN/Inf."""
  host = {k: float(np.asarray(v)) for k, v in host_metrics.items()}
  finite = host.pop("finite", 1.0) > 0 and np.isfinite(host["loss"])
  if not finite:
    ckpt.wait()
    saved = [s for s in ckpt.all_steps() if s < step]
    flags, why = divergence.resume_flags(config, health, saved)
    raise NonFiniteError(
        f"The state became NaN or infinite by step {step} (loss "
        f"{host['loss']}); stopping without saving it; {why}: go on with "
        f"{' '.join(flags)}.", flags)
  health.norms[step] = host["param_norm"]
  return host


# ------------------------------------------------------------------ CLI ----
def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/tiny.py[:ARG].",
      lock_config=True)
  flags.DEFINE_string("workdir", None,
                      "Where checkpoints, logs and the resolved config go.")
  flags.DEFINE_integer(
      "restore_step", None, "Resume from this checkpoint instead of the "
      "newest (the newer ones move to WORKDIR/checkpoints_superseded/).")
  flags.DEFINE_list(
      "allow_changes", [], "Config fields (or prefixes, e.g. optimizer) a "
      "resumed run changes on purpose, e.g. a lower learning rate after a NaN "
      "stop; fields that shape the state cannot be changed.")
  flags.DEFINE_bool(
      "start_over", False, "Train from step 0 on purpose although the "
      "workdir has checkpoints (they move to WORKDIR/checkpoints_superseded/)"
      " or only damaged ones.")
  cli.define_multihost_flags()
  flags.DEFINE_string(
      "profile_steps", None, "A:B writes a jax.profiler trace of steps A to "
      "B - 1 in WORKDIR/plugins/profile/ (TensorBoard's Profile tab).")
  flags.register_validator("profile_steps", lambda v: v is None or bool(
      _profile_steps(v)), "give A:B with 0 <= A < B, e.g. 10:15.")


def _profile_steps(text: str | None) -> tuple[int, int] | None:
  m = re.fullmatch(r"(\d+):(\d+)", text or "")
  return (int(m[1]), int(m[2])) if m and int(m[1]) < int(m[2]) else None


def main(argv):
  del argv  # Flags only (cli.run).
  f = flags.FLAGS
  config = cli.config()
  if config is None or not f.workdir:
    cli.exit_error("give --config=configs/NAME.py[:ARG] and --workdir=DIR.",
                   cli.EXIT_USAGE)
  storage.quiet_closed_event_loops()
  storage.check(f.workdir)
  cli.join_job()
  try:
    final = train_and_evaluate(config, f.workdir, f.restore_step,
                               f.allow_changes, f.start_over,
                               _profile_steps(f.profile_steps))
  except NonFiniteError as e:
    cli.exit_error(f"{e} The command: {divergence.command(sys.argv, e.flags)}")
  if final.get("preempted"):
    sys.exit(preempt.EXIT_PREEMPTED)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
