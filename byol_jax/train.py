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

# Before TensorFlow can be imported: no C++ start-up notices on the console
# (TensorFlow only decodes and crops images here, so its oneDNN kernels for
# matrix products are not needed).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from byol_jax import checkpoint  # noqa: E402
from byol_jax import data  # noqa: E402
from byol_jax import methods  # noqa: E402
from byol_jax import metric_writer  # noqa: E402
from byol_jax import multihost  # noqa: E402
from byol_jax import optim  # noqa: E402
from byol_jax import prepare  # noqa: E402
from byol_jax import progress  # noqa: E402
from byol_jax import resume  # noqa: E402
from byol_jax import sharding  # noqa: E402
from byol_jax import step as step_lib  # noqa: E402
from byol_jax import train_state  # noqa: E402
from byol_jax import validate  # noqa: E402
from byol_jax import workdir as workdir_lib  # noqa: E402
from byol_jax.errors import ConfigError  # noqa: E402
from byol_jax.evaluation import monitor as monitor_lib  # noqa: E402

EXIT_PREEMPTED = 143
EXIT_INTERRUPTED = 130


class NonFiniteError(RuntimeError):
  """The loss or the state became NaN or infinite; nothing after is saved."""


def _fetch(tree):
  """The loop's only device-to-host read (at log and save steps)."""
  return jax.device_get(tree)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       restore_step: int | None = None,
                       allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
  """Trains (resuming from WORKDIR's newest checkpoint) and evaluates.

  Args:
    config: the run's config (see byol_jax.config_lib).
    workdir: the run's directory.
    restore_step: resume from this checkpoint instead of the newest.
    allow_changes: config fields a resumed run changes on purpose.

  Returns:
    The final metrics (train metrics of the last logged step, eval results,
    'step', and 'preempted' when SIGTERM stopped the run after saving).

  Raises:
    ConfigError: a bad config, data, workdir or checkpoint (one line).
    NonFiniteError: the state became NaN/Inf (names the checkpoint to use).
    checkpoint.StorageError: checkpoints cannot be written or read.
  """
  say = progress.say
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

  with contextlib.ExitStack() as stack:
    lock = workdir_lib.WorkdirLock(workdir)
    lock.acquire()
    stack.callback(lock.release)  # Released last, after the saves finish.

    # --- Optimizer and schedules.
    tx, lr_fn = optim.build_optimizer(config, total_steps, steps_per_epoch,
                                      warmup_steps)
    tau_fn = (optim.tau_schedule(config.tau_base, total_steps)
              if method.HAS_TARGET else None)

    # --- Restore or initialise: decided once, before the data is built.
    ckpt = stack.enter_context(checkpoint.Checkpointer(workdir, config))
    abstract = train_state.abstract(config, model, tx, mesh, method.HAS_TARGET)
    state, step = resume.restore_or_init(
        ckpt, config, abstract,
        lambda: train_state.create(config, model, tx, mesh, method.HAS_TARGET),
        restore_step, say=say, allow=tuple(allow_changes))
    workdir_lib.write_config(workdir, config)
    say(f"Resuming from step {step}." if step else "Starting from step 0.")

    # --- Data, built once at the start step; evaluators, built once.
    pipeline = data.build_pretrain(config, mesh, start_step=step)
    monitor = monitor_lib.Monitor(config, mesh)
    evaluate = monitor.enabled and bool(config.data.eval_split)

    # --- The compiled step.
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(config, model, tx, lr_fn, tau_fn), mesh)

    # --- The loop: it steps, logs, saves and evaluates; it reads from the
    # devices only on steps that log, save or evaluate.
    writer = stack.enter_context(metric_writer.MetricWriter(workdir))
    meter = progress.Progress(step, total_steps, config.batch_size,
                              steps_per_epoch)
    # XLA:CPU's simulated devices can deadlock with a deep queue of
    # collectives: there, run at most one step ahead.
    throttle = jax.default_backend() == "cpu"
    final: dict[str, Any] = {}
    metrics = previous = None
    while step < total_steps:
      with jax.transfer_guard("disallow"):
        state, metrics = train_step(state, pipeline.batch(step))
      step += 1
      if not meter.measuring:
        jax.block_until_ready(metrics)  # Once: compilation ends here.
        meter.first_step_done(step)
      elif throttle:
        jax.block_until_ready(previous)
      previous = metrics
      host = None
      if step % config.log_every_steps == 0 or step == total_steps:
        host = _checked(_fetch(metrics), step, ckpt)
        ckpt.check_for_errors()
        host.update(epoch=step / steps_per_epoch,
                    images_per_sec=meter.rate(step) or 0.0)
        writer.write(step, host)
        final.update(host)
        say(meter.line(step, host))
      if step < total_steps and ckpt.should_save(step):
        if host is None:
          _checked(_fetch(metrics), step, ckpt)
        ckpt.save(step, state)
        say(f"step {step}: checkpoint -> {ckpt.directory}/{step}")
        if ckpt.preempted:
          ckpt.wait()
          say(f"Preempted: saved step {step}; run the same command to "
              "resume.")
          return dict(final, step=step, preempted=True)
      if (evaluate and config.eval_every_steps and step < total_steps and
          step % config.eval_every_steps == 0):
        results = _evaluate(monitor, state)
        writer.write(step, results)
        say(progress.eval_line(step, results))

    # --- The end: a final checkpoint (the last step was checked where it
    # logged) and evaluation.
    ckpt.save(step, state)
    ckpt.wait()
    say(f"step {step}: checkpoint -> {ckpt.directory}/{step}")
    if evaluate:
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


def _checked(host_metrics: dict, step: int,
             ckpt: checkpoint.Checkpointer) -> dict:
  """Floats of the fetched metrics; raises NonFiniteError on NaN/Inf."""
  host = {k: float(np.asarray(v)) for k, v in host_metrics.items()}
  finite = host.pop("finite", 1.0) > 0 and np.isfinite(host["loss"])
  if not finite:
    ckpt.wait()
    saved = [s for s in ckpt.all_steps() if s < step]
    resume_from = (f"every checkpoint kept (steps {saved}) is finite: resume "
                   f"with --restore_step={saved[-1]} (or an earlier one if it "
                   "stops again) --config.optimizer.base_lr=LOWER "
                   "--allow_changes=optimizer.base_lr"
                   if saved else "no checkpoint was saved before it: lower "
                   "--config.optimizer.base_lr and start again")
    raise NonFiniteError(
        f"The state became NaN or infinite by step {step} (loss "
        f"{host['loss']}); stopping without saving it; {resume_from}.")
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
  flags.DEFINE_enum(
      "multihost", "auto", ["auto", "yes", "no"],
      "Join jax.distributed: auto = when the environment is a multi-host "
      "cluster (Cloud TPU pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (else auto-detect).")
  flags.DEFINE_integer("num_processes", None,
                       "Processes in the job (else detected).")
  flags.DEFINE_integer("process_id", None,
                       "This process's index (else detected).")


def _flag_error(e: BaseException) -> str:
  """One line for an error in the command line or in loading the config."""
  if isinstance(e, (AttributeError, KeyError)):  # --config.<unknown>=...
    text = str(e.args[0] if e.args else e)
    field, _, hint = text.partition("\n")
    return (f"unknown config field {field.strip(chr(39) + chr(34))!r} in a "
            f"--config.FIELD=VALUE override{'; ' + hint if hint else ''}; see "
            "the config file and byol_jax/config_lib.py for the fields.")
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if len(lines) > 1:  # A traceback inside the message: its last line says it.
    flag = lines[0].split(":")[0] if lines[0].startswith("flag --") else ""
    return f"{flag}: {lines[-1]}" if flag else lines[-1]
  return lines[0] if lines else type(e).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config and flag errors as one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, OSError, ValueError,
          TypeError) as e:
    _exit_error(_flag_error(e), 2)
  return []


def _quiet_orbax(record) -> bool:
  """Drops Orbax's log records below CRITICAL (a logging filter)."""
  return "/orbax/" not in record.pathname or record.levelno >= 50


def _exit_error(message: str, code: int = 1) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


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
  if not flags.FLAGS["verbosity"].present:
    # The trainer's own lines only; --verbosity=0 shows the libraries' INFO.
    logging.set_verbosity(logging.WARNING)
    # Orbax logs the tracebacks of failed background saves; the trainer
    # reports the same failure in one line (StorageError).
    logging.get_absl_handler().addFilter(_quiet_orbax)
  try:
    multihost.initialize(f.multihost, f.coordinator_address,
                         f.num_processes, f.process_id)
    final = train_and_evaluate(config, f.workdir, f.restore_step,
                               f.allow_changes)
  except (ConfigError, NonFiniteError) as e:
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
  if final.get("preempted"):
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse_flags)
