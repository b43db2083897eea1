"""A multi-process job that loses a process: one `error:` line, no lock left.

The other processes then stop from a C++ thread of JAX's coordination
service (fatal log, stack trace, SIGABRT) that Python cannot intercept.
`guard_stderr()` routes stderr through a child process (this file as a
program) that turns that block into one line and removes the workdir lock
if it still names this job (`announce_lock`).
"""
import json
import os
import re
import signal
import subprocess
import sys

_MAGIC = "\x1fbyol_jax-lock "
_FATAL = "Terminating process because the JAX distributed service detected"
# C++ log lines (and their continuation lines) of the coordination service
# that come just before the fatal one: held back, dropped if it follows.
_COORDINATION = ("coordination_service", "preemption_sync_manager",
                 "client.h", "client.cc")
_LOG_LINE = re.compile(r"^[IWEF]\d{4} ")
_child = None
_announced = None


def guard_stderr() -> None:
  """Starts the stderr filter (call once, before joining the job)."""
  global _child
  if _child is not None:
    return
  sys.stderr.flush()
  # By file, not `-m byol_jax...`: the package would import JAX and Orbax.
  _child = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
      stdout=subprocess.DEVNULL, stderr=None, start_new_session=True,
      close_fds=True)
  os.dup2(_child.stdin.fileno(), 2)  # fd 2 is now the pipe to the filter.
  _child.stdin.close()


def announce_lock(path: str, token: int) -> None:
  """Tells the filter the job's lock (token 0: no lock to remove)."""
  global _announced
  _announced = [path, int(token)]
  if _child is not None:
    sys.stderr.write(f"{_MAGIC}{json.dumps([path, int(token)])}\n")
    sys.stderr.flush()


def lost_process(cause: str) -> str:
  """The line for a job that lost a process."""
  return (f"error: the job lost a process ({cause}); this process stops too. "
          "The checkpoints saved so far are complete: start the whole job "
          "again to resume.")


def _summary(text: str) -> str:
  """The status of JAX's fatal message, on one line."""
  _, found, status = text.partition("absl::Status:")
  status = status.split(" [type.googleapis.com", 1)[0] if found else ""
  return " ".join(status.split())[:300]


def remove_job_lock(lock=None) -> None:
  """Removes the job's lock (default: the announced one) if it still names
  this job."""
  lock = lock or _announced
  if not lock or not lock[1]:
    return
  try:
    os.environ.setdefault("EPATH_USE_TF", "false")
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(lock[0])
    if json.loads(path.read_text()).get("token") == lock[1]:
      path.unlink(missing_ok=True)
  except Exception:  # pylint: disable=broad-except
    pass  # Gone already, or unreadable: the next start decides.


def _filter() -> None:
  """The child: stdin to stderr, the fatal block as one line."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  out = sys.stderr.buffer
  lock = None
  fatal = ""
  held: list[bytes] = []  # A coordination-service block, not yet shown.
  said = False

  def say(text):
    cause = _summary(text) or "see the other processes"
    out.write((lost_process(cause) + "\n").encode())
    out.flush()

  def show(lines):
    out.writelines(lines)
    out.flush()
    lines.clear()

  for raw in sys.stdin.buffer:
    line = raw.decode("utf-8", "replace")
    if line.startswith(_MAGIC):
      lock = json.loads(line[len(_MAGIC):])
      continue
    if fatal:  # The fatal block: its status (said once), its stack trace.
      if not said and ("stack trace" in line or line.startswith("RPC:")):
        say(fatal)
        said = True
      elif not said:
        fatal += line
      continue
    if _FATAL in line:
      fatal = line
      held.clear()
      continue
    is_log = bool(_LOG_LINE.match(line))
    if is_log and any(name in line.split("]")[0] for name in _COORDINATION):
      held.append(raw)
      continue
    if held and not is_log and not line.startswith(("[Gloo]", "error:")):
      held.append(raw)  # A continuation line of the held block.
      continue
    show(held)
    show([raw])
  show(held)
  if fatal and not said:
    say(fatal)
  if fatal:
    remove_job_lock(lock)


if __name__ == "__main__":
  _filter()
