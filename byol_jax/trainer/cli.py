"""The command line shared by train, linear_eval, convert and prepare.

`run(main)`: a quiet console (`--verbosity=0` brings absl's logs back),
`--help` exit 0, a bad flag or config one `error:` line (exit 2); from
`main`, ConfigError, StorageError or a lost process one line (exit 1),
Ctrl-C exit 130.
"""
import logging as std_logging
import os
import re
import sys
from typing import Callable, NoReturn

import jax
from absl import app
from absl import flags
from absl import logging

from byol_jax.errors import ConfigError
from byol_jax.errors import StorageError
from byol_jax.trainer import job_errors
from byol_jax.trainer import multihost

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Exceptions that loading flags and config files raise for a user's mistake.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, ValueError,
               TypeError)


def exit_error(message: str, code: int = EXIT_ERROR) -> NoReturn:
  """Prints one `error: MESSAGE` line on stderr and exits with `code`."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def flag_error(e: BaseException) -> str:
  """One line for an error in the command line or in loading the config."""
  unknown = isinstance(e, (AttributeError, KeyError)) or (
      isinstance(e, flags.UnrecognizedFlagError) and "config." in str(e))
  if unknown:  # --config.<unknown field>=...
    # ml_collections raises AttributeError(KeyError("'x'\nDid you mean ...")):
    # the innermost argument is the text.
    while isinstance(e, BaseException) and e.args:
      e = e.args[0]
    field, _, hint = str(e).partition("\n")
    field = field.strip().strip("'\"").removeprefix("config.")
    if "'config." in field:  # absl: "Unknown command line flag 'config.x'"
      field = field.split("'")[1].removeprefix("config.")
    guess = re.search(r'Did you mean "([^"]+)"', hint)
    hint = f": did you mean {guess.group(1)!r}?" if guess else ""
    return (f"unknown config field {field!r} in a --config.FIELD=VALUE "
            f"override{hint} (the fields are in the config file and "
            "byol_jax/trainer/config_lib.py).")
  # A traceback inside the message: its last line says it.
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  lines = lines or [type(e).__name__]
  if len(lines) > 1 and lines[0].startswith("flag --"):
    return f"{lines[0].split(':')[0]}: {lines[-1]}"
  return lines[-1]


class _PlainFormatter(std_logging.Formatter):
  """'warning: MESSAGE' (or 'error: ...'), without absl's prefix."""

  def format(self, record) -> str:
    level = "warning" if record.levelno < std_logging.ERROR else "error"
    return f"{level}: {record.getMessage()}"


def _quiet_console() -> None:
  if flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  handler = logging.get_absl_handler()
  # Orbax logs the tracebacks of failed background saves: said in one line.
  handler.addFilter(lambda r: "/orbax/" not in r.pathname or r.levelno >= 50)
  handler.python_handler.setFormatter(_PlainFormatter())
  std_logging.captureWarnings(True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing: errors as one line, --help exit 0, quiet console."""
  argv = ["--help" if a in ("-h", "-?") else a for a in argv]
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:  # --help printed the usage.
    if any(a.startswith("--help") for a in argv[1:]) and e.code in (0, 1):
      sys.stdout.flush()
      sys.exit(0)
    raise
  except FLAG_ERRORS as e:
    exit_error(flag_error(e), EXIT_USAGE)
  _quiet_console()
  return rest


def config():
  """The --config flag's ConfigDict (or None); load errors exit 2."""
  try:
    value = flags.FLAGS.config
    if value is not None:
      value.get("method")  # A config that failed to load raises here.
  except FLAG_ERRORS as e:
    exit_error(flag_error(e), EXIT_USAGE)
  return value


def define_multihost_flags() -> None:
  """The flags that `join_job` reads."""
  flags.DEFINE_enum(
      "multihost", "auto", ["auto", "yes", "no"],
      "Join jax.distributed: auto = when the cluster (Cloud TPU pod, SLURM, "
      "Open MPI ...) has several processes or flags describe a job.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (else auto-detect).")
  flags.DEFINE_integer("num_processes", None,
                       "Processes in the job (else detected).")
  flags.DEFINE_integer("process_id", None,
                       "This process's index (else detected).")
  flags.DEFINE_integer(
      "heartbeat_timeout_seconds", multihost.HEARTBEAT_TIMEOUT_SECONDS,
      "Several processes: how long a silent process counts as alive; when "
      "one dies the others stop (one error line) about this long after.")
  flags.DEFINE_integer(
      "shutdown_timeout_seconds", multihost.SHUTDOWN_TIMEOUT_SECONDS,
      "Several processes: how long a finished process waits for the others.")


def join_job() -> bool:
  """Joins the multi-host job that the flags or the cluster describe."""
  f = flags.FLAGS
  return multihost.initialize(
      f.multihost, f.coordinator_address, f.num_processes, f.process_id,
      # A lost process: one line, not JAX's C++ dump.
      before_join=job_errors.guard_stderr,
      heartbeat_timeout_seconds=f.heartbeat_timeout_seconds,
      shutdown_timeout_seconds=f.shutdown_timeout_seconds)


def run(main: Callable[[list[str]], None],
        commands: tuple[str, ...] = ()) -> None:
  """`app.run(main)` with the shared parsing and error lines; argv names
  one of `commands` (or nothing if there are none)."""
  def checked(argv):
    rest = argv[1:]
    if commands and (len(rest) != 1 or rest[0] not in commands):
      exit_error(f"give one command, {' or '.join(commands)}; got {rest}.",
                 EXIT_USAGE)
    if not commands and rest:
      exit_error(f"unexpected arguments {rest}; give flags only.", EXIT_USAGE)
    try:
      return main(argv)
    except (ConfigError, StorageError) as e:
      sys.stdout.flush()
      print(f"error: {e}", file=sys.stderr, flush=True)
      if getattr(e, "instructions", ""):  # What the line points at.
        print(e.instructions, flush=True)
      if isinstance(e, StorageError):  # Orbax's threads would wait forever.
        os._exit(EXIT_ERROR)  # pylint: disable=protected-access
      sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:  # The saves in flight were finished.
      exit_error("interrupted; everything saved so far is complete: run the "
                 "same command to resume.", EXIT_INTERRUPTED)
    except jax.errors.JaxRuntimeError as e:
      if jax.process_count() == 1:
        raise
      # A collective failed: another process of the job stopped.
      sys.stdout.flush()
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      print(job_errors.lost_process(f"a collective failed: {first}"),
            file=sys.stderr, flush=True)
      job_errors.remove_job_lock()
      os._exit(EXIT_ERROR)  # pylint: disable=protected-access

  app.run(checked, flags_parser=parse_flags)
