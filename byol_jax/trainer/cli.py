"""The command line shared by train, linear_eval, convert and prepare.

Every command gets the same behaviour from `run(main)`:
- a quiet console: the command's own lines only. Libraries' INFO logs are
  off and their warnings are one plain `warning: ...` line each (Python
  warnings included); TensorFlow's C++ start-up notices are off (set here,
  before anything imports TensorFlow). `--verbosity=0` (or higher) shows
  the libraries' logs in absl's format again.
- mistakes in the flags or the config are one `error: ...` line and exit
  code 2, before anything is compiled; `ConfigError`s from `main` are one
  `error:` line and exit code 1.
- `--help` (also `-h`, `--helpshort`, `--helpfull`) prints the usage and
  exits 0.
- the multi-host flags (`define_multihost_flags`), checked together by
  `multihost.initialize` before anything starts.
"""
import logging as std_logging
import os
import re
import sys
from typing import Callable, NoReturn

# Before TensorFlow can be imported: no C++ start-up notices on the console
# (TensorFlow only decodes, crops and writes datasets here, so its oneDNN
# kernels for matrix products are not needed).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from byol_jax.errors import ConfigError  # noqa: E402

EXIT_ERROR = 1
EXIT_USAGE = 2
_HELP = ("--help", "-h", "--helpshort", "--helpfull", "-?")
# Exceptions that loading flags and config files raise for a user's mistake.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, ValueError,
               TypeError)


def exit_error(message: str, code: int = EXIT_ERROR) -> NoReturn:
  """Prints one `error: MESSAGE` line on stderr and exits with `code`."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _innermost_text(e: BaseException) -> str:
  """The message of `e`, unwrapping exceptions that wrap exceptions.

  ml_collections raises AttributeError(KeyError("'x'\\nDid you mean ...")):
  str() of it is the repr of the repr; the innermost string is the text.
  """
  value = e
  while isinstance(value, BaseException) and value.args:
    value = value.args[0]
  return str(value)


def flag_error(e: BaseException) -> str:
  """One line for an error in the command line or in loading the config."""
  if isinstance(e, (AttributeError, KeyError)):  # --config.<unknown>=...
    text = _innermost_text(e)
    field, _, hint = text.partition("\n")
    field = field.strip().strip("'\"")
    guess = re.search(r'Did you mean "([^"]+)"', hint)
    hint = f": did you mean {guess.group(1)!r}?" if guess else ""
    return (f"unknown config field {field!r} in a --config.FIELD=VALUE "
            f"override{hint} (the fields are in the config file and "
            "byol_jax/trainer/config_lib.py).")
  if isinstance(e, flags.UnrecognizedFlagError) and "config." in str(e):
    name = str(e).split("'")[1] if "'" in str(e) else str(e)
    return (f"unknown config field {name.removeprefix('config.')!r} in a "
            "--config.FIELD=VALUE override; see the config file and "
            "byol_jax/trainer/config_lib.py for the fields.")
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if len(lines) > 1:  # A traceback inside the message: its last line says it.
    flag = lines[0].split(":")[0] if lines[0].startswith("flag --") else ""
    return f"{flag}: {lines[-1]}" if flag else lines[-1]
  return lines[0] if lines else type(e).__name__


def _quiet_orbax(record) -> bool:
  """Drops Orbax's log records below CRITICAL (a logging filter): Orbax logs
  the tracebacks of failed background saves, which the commands report in
  one line."""
  return "/orbax/" not in record.pathname or record.levelno >= 50


class _PlainFormatter(std_logging.Formatter):
  """'warning: MESSAGE' (or 'error: ...'), without absl's prefix."""

  def format(self, record) -> str:
    level = "warning" if record.levelno < std_logging.ERROR else "error"
    return f"{level}: {record.getMessage()}"


def quiet_console() -> None:
  """The commands' console, unless --verbosity was given (see the module)."""
  if flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  handler = logging.get_absl_handler()
  handler.addFilter(_quiet_orbax)
  handler.python_handler.setFormatter(_PlainFormatter())
  # Python warnings (e.g. a library's DeprecationWarning or UserWarning)
  # become one 'warning:' line each through the same handler.
  std_logging.captureWarnings(True)


def _asks_help(argv: list[str]) -> bool:
  return any(a in _HELP or a.startswith("--help") for a in argv[1:])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing: errors as one line, --help exit 0, quiet console."""
  argv = ["--help" if a == "-h" else a for a in argv]
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:  # --help printed the usage.
    if _asks_help(argv) and e.code in (0, 1):
      sys.stdout.flush()
      sys.exit(0)
    raise
  except FLAG_ERRORS as e:
    exit_error(flag_error(e), EXIT_USAGE)
  quiet_console()
  return rest


def no_arguments(argv: list[str], usage: str = "give flags only") -> None:
  """One error line for positional arguments a command does not take."""
  if len(argv) > 1:
    exit_error(f"unexpected arguments {argv[1:]}; {usage}.", EXIT_USAGE)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with the shared flag parsing and error lines.

  `main` may raise ConfigError: it becomes one `error:` line and exit 1.
  """
  def checked(argv):
    try:
      return main(argv)
    except ConfigError as e:
      exit_error(str(e))
  app.run(checked, flags_parser=parse_flags)


def define_multihost_flags() -> None:
  """--multihost, --coordinator_address, --num_processes, --process_id."""
  flags.DEFINE_enum(
      "multihost", "auto", ["auto", "yes", "no"],
      "Join jax.distributed: auto = when the environment is a multi-host "
      "cluster (Cloud TPU pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) or "
      "a process count, id or coordinator is given.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (else auto-detect).")
  flags.DEFINE_integer("num_processes", None,
                       "Processes in the job (else detected).")
  flags.DEFINE_integer("process_id", None,
                       "This process's index (else detected).")


def multihost_flags() -> dict:
  """The multi-host flags' values, as `multihost.initialize` takes them."""
  f = flags.FLAGS
  return dict(mode=f.multihost, coordinator_address=f.coordinator_address,
              num_processes=f.num_processes, process_id=f.process_id)
