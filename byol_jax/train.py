r"""Self-supervised pretraining: BYOL, SimSiam or SimCLR.

  python -m byol_jax.train --config=configs/byol_cifar10.py --workdir=/tmp/run
  python -m byol_jax.train --config=configs/byol_r50.py:epochs=1000 \
      --config.batch_size=4096 --workdir=gs://BUCKET/run

The same command runs on one CPU, a GPU box, a multi-node GPU cluster and a
Cloud TPU pod slice: on several hosts it joins JAX's multi-controller runtime,
every host reads its own shard of the data and all of them run this file.
Running it again resumes from the newest checkpoint (`--restore_step=N`: from
an older one). Exit codes: 0 done, 1 an error (one `error:` line), 2 a bad
command line, 130 interrupted (Ctrl-C), 143 (128 + SIGTERM) preempted after saving
a checkpoint: run the same command again to resume.
"""
import contextlib
import os
import sys
from typing import Any

# First: it keeps TensorFlow's C++ start-up notices off the console.
from byol_jax.trainer import cli  # noqa: E402  pylint: disable=g-bad-import-order

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from byol_jax.trainer import checkpoint  # noqa: E402
from byol_jax.trainer import checkpoint_facts  # noqa: E402
from byol_jax import data  # noqa: E402
from byol_jax.trainer import divergence  # noqa: E402
from byol_jax.trainer import job_errors  # noqa: E402
from byol_jax.trainer import lock as lock_lib  # noqa: E402
from byol_jax.core import methods  # noqa: E402
from byol_jax.trainer import metric_writer  # noqa: E402
from byol_jax.trainer import multihost  # noqa: E402
from byol_jax.core import optim  # noqa: E402
from byol_jax.trainer import preempt  # noqa: E402
from byol_jax import prepare  # noqa: E402
from byol_jax import progress  # noqa: E402
from byol_jax.trainer import resume  # noqa: E402
from byol_jax.core import sharding  # noqa: E402
from byol_jax.core import step as step_lib  # noqa: E402
from byol_jax import storage  # noqa: E402
from byol_jax.core import train_state  # noqa: E402
from byol_jax.trainer import validate  # noqa: E402
from byol_jax.errors import ConfigError  # noqa: E402
from byol_jax.evaluation import monitor as monitor_lib  # noqa: E402

EXIT_PREEMPTED = 143
EXIT_INTERRUPTED = 130


class NonFiniteError(RuntimeError):
  """The loss or the state became NaN or infinite; nothing after is saved.

  Attributes:
    flags: the trainer flags that resume from a healthy checkpoint (or
      start over) at a lower learning rate (`divergence.resume_flags`).
  """

  def __init__(self, message: str, flags: list[str]):
    super().__init__(message)
    self.flags = flags


def _fetch(tree):
  """The loop's only device-to-host read (at log and save steps)."""
  return jax.device_get(tree)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       restore_step: int | None = None,
                       allow_changes: tuple[str, ...] = (),
                       start_over: bool = False) -> dict[str, Any]:
  """Trains (resuming from WORKDIR's newest checkpoint) and evaluates.

  Args:
    config: the run's config (see byol_jax.trainer.config_lib).
    workdir: the run's directory.
    restore_step: resume from this checkpoint instead of the newest.
    allow_changes: config fields a resumed run changes on purpose.
    start_over: train from step 0 although the workdir has checkpoints
      (they move to WORKDIR/checkpoints_superseded/) or had only damaged
      ones.

  Returns:
    The final metrics (train metrics of the last logged step, eval results,
    'step', and 'preempted' when SIGTERM stopped the run after saving).

  Raises:
    ConfigError: a bad config, data, workdir or checkpoint (one line).
    NonFiniteError: the state became NaN/Inf (names the checkpoint to use).
    checkpoint.StorageError: checkpoints cannot be written or read.
  """
  say = progress.say
  storage.check(workdir)
  storage.check(config.data.get("data_dir") or "", "--config.data.data_dir")
  # --- Config and data: checked before anything is compiled; a TFDS
  # dataset that TFDS can download is downloaded and prepared first.
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
    ckpt = stack.enter_context(checkpoint.Checkpointer(workdir, config))
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
    evaluate = monitor.enabled and bool(config.data.eval_split)

    # --- The compiled step.
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(config, model, tx, lr_fn, tau_fn), mesh)

    # --- The loop: it steps, logs, saves and evaluates; it reads from the
    # devices only on steps that log, save or evaluate.
    writer = stack.enter_context(metric_writer.MetricWriter(workdir))
    guard.on_exit(writer.close)
    health = _start_health(workdir, state, step, writer)
    meter = progress.Progress(step, total_steps, config.batch_size,
                              steps_per_epoch)
    # XLA:CPU's simulated devices can deadlock with a deep queue of
    # collectives: there, run at most one step ahead.
    throttle = jax.default_backend() == "cpu"
    final: dict[str, Any] = {}
    metrics = previous = None
    while step < total_steps:
      first = not meter.measuring
      if first:
        say("Compiling the train step (the first step takes longer).")
      with (guard.busy("compiling the train step") if first
            else contextlib.nullcontext()):
        with jax.transfer_guard("disallow"):
          state, metrics = train_step(state, pipeline.batch(step))
        if first:
          jax.block_until_ready(metrics)  # Once: compilation ends here.
      step += 1
      if first:
        meter.first_step_done(step)
      elif throttle:
        jax.block_until_ready(previous)
      previous = metrics
      host = None
      if step % config.log_every_steps == 0 or step == total_steps:
        host = _checked(_fetch(metrics), step, ckpt, config, health)
        ckpt.say_committed(say)
        host.update(epoch=step / steps_per_epoch,
                    images_per_sec=meter.rate(step) or 0.0)
        _check_decoding(config, pipeline, host, step, meter)
        writer.write(step, host)
        final.update(host)
        say(meter.line(step, host))
      if step < total_steps and ckpt.should_save(step):
        if host is None:  # Its norm, for the advice after a NaN stop.
          norm = _checked(_fetch(metrics), step, ckpt, config,
                          health)["param_norm"]
          writer.write(step, {"param_norm": norm})
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

    # --- The end: a final checkpoint (the last step was checked where it
    # logged) and evaluation.
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
  """Adds the count of images that failed to decode (replaced, so that the
  stream never shifts) to `host`; raises ConfigError past the threshold."""
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


def _start_health(workdir, state, step: int,
                  writer: metric_writer.MetricWriter) -> divergence.Health:
  """Parameter norms so far; the norm at step 0 is logged when a run starts
  (or remembered, for a run that began before it was logged)."""
  health = divergence.Health(workdir)
  if 0 not in health.norms:
    health.record(0, divergence.param_norm(state.params))
    if step == 0:
      writer.write(0, {"param_norm": health.norms[0]})
  return health


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
  health.record(step, host["param_norm"])
  return host


# ------------------------------------------------------------------ CLI ----
def define_flags() -> None:
  """The command line's flags (defined only when run as a program, so that
  the library can be imported beside other absl programs)."""
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
  flags.DEFINE_integer(
      "heartbeat_timeout_seconds", multihost.HEARTBEAT_TIMEOUT_SECONDS,
      "Several processes: how long a silent process counts as alive; when "
      "one dies the others stop (one error line) about this long after.")
  flags.DEFINE_integer(
      "shutdown_timeout_seconds", multihost.SHUTDOWN_TIMEOUT_SECONDS,
      "Several processes: how long a finished process waits for the others.")


# The command line's parsing, errors and console (shared with the other
# commands).
_flag_error = cli.flag_error
_parse_flags = cli.parse_flags
_exit_error = cli.exit_error


def main(argv):
  if len(argv) > 1:
    _exit_error(f"unexpected arguments {argv[1:]}; give flags only.", 2)
  f = flags.FLAGS
  try:
    config = f.config
    if config is not None:
      config.get("method")  # A config that failed to load raises here.
  except (flags.Error, AttributeError, KeyError, OSError, ValueError,
          TypeError) as e:
    _exit_error(_flag_error(e), 2)
  if config is None or not f.workdir:
    _exit_error("give --config=configs/NAME.py[:ARG] and --workdir=DIR.", 2)
  checkpoint_facts.quiet_closed_event_loops()
  try:
    storage.check(f.workdir)
    multihost.check_flags(f.multihost, f.coordinator_address,
                          f.num_processes, f.process_id)
    if multihost.should_join(f.multihost, f.coordinator_address,
                             f.num_processes, f.process_id):
      job_errors.guard_stderr()  # A lost process: one line, not a dump.
    multihost.initialize(
        f.multihost, f.coordinator_address, f.num_processes, f.process_id,
        heartbeat_timeout_seconds=f.heartbeat_timeout_seconds,
        shutdown_timeout_seconds=f.shutdown_timeout_seconds)
    final = train_and_evaluate(config, f.workdir, f.restore_step,
                               f.allow_changes, f.start_over)
  except NonFiniteError as e:
    _exit_error(f"{e} The command: {divergence.command(sys.argv, e.flags)}")
  except ConfigError as e:
    _exit_error(str(e))
  except checkpoint.StorageError as e:
    # Orbax's threads of the failed save wait for signals that never come;
    # the checkpoints, writers and lock are closed already: leave now.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
  except KeyboardInterrupt:
    # The saves in flight were finished on the way out.
    _exit_error("interrupted; the checkpoints saved so far are complete: "
                "run the same command to resume.", EXIT_INTERRUPTED)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective failed: another process of the job stopped.
    print(f"error: the job lost a process (a collective failed: "
          f"{checkpoint.first_line(e)}); this process stops too. The "
          "checkpoints saved so far are complete: start the whole job again "
          "to resume.", file=sys.stderr, flush=True)
    job_errors.remove_job_lock()
    os._exit(1)  # pylint: disable=protected-access
  if final.get("preempted"):
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse_flags)
