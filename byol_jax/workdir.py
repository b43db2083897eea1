"""The run's directory: writable, locked by one trainer, config.json.

The lock is WORKDIR/trainer.lock, a JSON file naming its holder (host, pid,
start and heartbeat times), created by process 0. A second trainer on the
same workdir refuses with one line; a lock left by a dead process (same
host and the pid is gone, or a heartbeat older than `STALE_SECONDS`) is
taken over with a warning. A daemon thread refreshes the heartbeat every
`HEARTBEAT_SECONDS`, so a long evaluation never looks dead.
"""
import json
import os
import socket
import threading
import time
import uuid

import jax
import ml_collections
from absl import logging
from etils import epath

from byol_jax import checkpoint
from byol_jax.errors import ConfigError

LOCK_NAME = "trainer.lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by someone else.
    return True
  return True


def check_writable(workdir: epath.Path) -> None:
  """Creates the workdir and writes and removes a probe file in it.

  Raises:
    ConfigError: it is a file, or cannot be created or written.
  """
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass "
                      "a directory (it is created if missing).")
  probe = workdir / f".write_test.{uuid.uuid4().hex[:8]}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"--workdir={workdir} is not writable ({type(e).__name__}: "
        f"{checkpoint.first_line(e)}); pass a directory you can write to."
    ) from e


class WorkdirLock:
  """One trainer per workdir; process 0 holds the lock for the whole job."""

  def __init__(self, workdir: epath.Path):
    self.path = workdir / LOCK_NAME
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None
    self.held = False

  def _record(self, started: float) -> str:
    return json.dumps(dict(host=socket.gethostname(), pid=os.getpid(),
                           token=self._token, started=started,
                           heartbeat=time.time()))

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # Half-written or unreadable: treat as stale.

  def _stale(self, holder: dict) -> bool:
    if not holder:
      return True
    if holder.get("host") == socket.gethostname():
      return not _pid_alive(int(holder.get("pid", -1)))
    return time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS

  def _create(self, text: str) -> bool:
    """Creates the lock file unless it exists (atomic on local disks)."""
    if "://" in os.fspath(self.path):  # Buckets: write, then read back.
      if self.path.exists():
        return False
      self.path.write_text(text)
      return json.loads(self.path.read_text()).get("token") == self._token
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def acquire(self) -> None:
    """Checks the workdir is writable and takes the lock (process 0).

    Raises:
      ConfigError: on every process, when process 0 refuses.
    """
    refusal = ""
    if jax.process_index() == 0:
      refusal = self._try_acquire()
    # One decision for the whole job: process 0's.
    refused = checkpoint.shared_decision(int(bool(refusal)))
    if refused:
      raise ConfigError(refusal or f"{self.path.parent} is in use by another "
                        "trainer (see process 0's error).")
    if self.held:
      self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="workdir-lock-heartbeat")
      self._thread.start()

  def _try_acquire(self) -> str:
    try:
      check_writable(self.path.parent)
    except ConfigError as e:
      return str(e)
    started = time.time()
    for _ in range(3):
      if self._create(self._record(started)):
        self.held = True
        return ""
      holder = self._holder()
      if holder is None:
        continue  # Released meanwhile: try again.
      if not self._stale(holder):
        return (f"{self.path.parent} is in use by another trainer (pid "
                f"{holder.get('pid')} on host {holder.get('host')}, started "
                f"{time.ctime(float(holder.get('started', 0)))}); wait for "
                "it to finish, or pass another --workdir. If that process "
                f"is gone, delete {self.path}.")
      logging.warning("Taking over the lock of %s left by pid %s on host %s, "
                      "which is no longer running.", self.path.parent,
                      holder.get("pid"), holder.get("host"))
      self.path.unlink(missing_ok=True)
    return f"Could not take the lock {self.path}; delete it and try again."

  def _heartbeat(self) -> None:
    started = time.time()
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        self.path.write_text(self._record(started))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    """Removes the lock if this process holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if self.held:
      holder = self._holder()
      if holder and holder.get("token") == self._token:
        self.path.unlink(missing_ok=True)
      self.held = False


def write_config(workdir: epath.Path,
                 config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json: the resolved config of the latest start."""
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(
        checkpoint.config_to_json(config), indent=2, sort_keys=True))
