"""One trainer per workdir: WORKDIR/trainer.lock, held by the job's process 0.

The lock is JSON naming its holder (host, pid, boot id, start time in clock
ticks, pid namespace, the job's token) with a heartbeat refreshed every
`HEARTBEAT_SECONDS`. The holder is alive when it holds the file's `flock`
(local workdirs: the kernel drops it when the holder dies; on the same
kernel a free flock means it is gone); else, on the same kernel and pid
namespace, when its pid runs with its start time; else (another host or
container, or a bucket) when its heartbeat moves within `STALE_SECONDS`
(one older than `OLD_SECONDS` is dead at once). On a bucket the lock is
written and read back: the last writer wins. Process 0 shares the token.
"""
import fcntl
import json
import os
import random
import socket
import threading
import time
import uuid

import jax
from absl import logging
from etils import epath

from byol_jax import progress
from byol_jax import storage
from byol_jax.errors import ConfigError
from byol_jax.trainer import checkpoint_facts
from byol_jax.trainer import multihost

LOCK_NAME = "trainer.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 3 * HEARTBEAT_SECONDS   # A heartbeat that long unmoved: dead.
OLD_SECONDS = 600.0                      # Older than this by the clock: dead.
_POLL_SECONDS = 1.0
_RECORD_BYTES = 1024  # Local records are padded: overwritten in one write.


def _read(path: str, how=lambda p: epath.Path(p).read_text().strip()
          ) -> str | None:
  """A file's text (or what `how` reads), None if it cannot be read."""
  try:
    return how(path)
  except OSError:
    return None


def start_ticks(pid: int) -> int | None:
  """When process `pid` started (clock ticks since boot), or None if gone."""
  stat = _read(f"/proc/{pid}/stat")
  return int(stat.rsplit(")", 1)[1].split()[19]) if stat else None  # Field 22


class WorkdirLock:
  """The job's lock on WORKDIR (see the module docstring)."""

  def __init__(self, workdir: epath.Path):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._local = not storage.is_remote(self.path)
    self.token = 0  # The job's, shared by its processes (0: none).
    self.held = False
    self._fd = None
    self._me = dict(
        host=socket.gethostname(), pid=os.getpid(),
        boot_id=_read("/proc/sys/kernel/random/boot_id"),
        pid_ns=_read("/proc/self/ns/pid", os.readlink),
        start_ticks=start_ticks(os.getpid()), started=time.time())
    self._stop = threading.Event()
    self._thread = None

  def _write(self) -> None:
    """Writes this process's record with a fresh heartbeat."""
    record = json.dumps(dict(self._me, token=self.token, heartbeat=time.time()))
    if self._local:  # One write over the old record: never seen half-done.
      os.pwrite(self._fd, record.encode().ljust(_RECORD_BYTES), 0)
    else:
      self.path.write_text(record)

  def _holder(self) -> dict | None:
    """The lock's record; None if there is none (or it is empty), {} if
    unreadable."""
    try:
      text = self.path.read_text().strip()
      holder = json.loads(text) if text else None
    except FileNotFoundError:
      return None
    except (OSError, ValueError):  # Or its writer died while writing.
      return {}
    return holder if isinstance(holder, (dict, type(None))) else {}

  def _alive(self, holder: dict | None) -> bool:
    """Whether the writer of `holder` runs, where no flock tells: its pid
    and start time on this kernel, else its heartbeat."""
    if not holder:
      return False
    if holder.get("boot_id") and all(
        holder.get(k) == self._me[k] for k in ("boot_id", "pid_ns")):
      ticks = start_ticks(int(holder.get("pid", -1)))
      return ticks is not None and ticks == holder.get("start_ticks")
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)) or time.time() - beat > OLD_SECONDS:
      return False
    # A live holder moves its heartbeat within one interval.
    deadline = time.monotonic() + STALE_SECONDS
    while time.monotonic() < deadline:
      time.sleep(_POLL_SECONDS)
      now = self._holder()
      if now is None:
        return False  # Released meanwhile.
      if now and (now.get("heartbeat"), now.get("token")) != (
          beat, holder.get("token")):
        return True
    return False

  def acquire(self) -> None:
    """Takes the lock on process 0 and shares the decision and the token;
    raises ConfigError on every process when process 0 refuses."""
    refusal = ""
    if jax.process_index() == 0:
      self.token = random.getrandbits(31) or 1  # Shared as an int32.
      refusal = self._try_acquire()
    token = multihost.shared_decision(0 if refusal else self.token)
    if not token:
      raise ConfigError(refusal or f"{self.path.parent} is in use by another "
                        "trainer (see process 0's error).")
    self.token = token
    if self.held:
      self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="workdir-lock-heartbeat")
      self._thread.start()

  def _try_acquire(self) -> str:
    """Takes the lock; returns why not ('' if taken)."""
    workdir = self.path.parent
    if workdir.exists() and not workdir.is_dir():
      return (f"--workdir={workdir} is a file, not a directory; pass a "
              "directory (it is created if missing).")
    probe = workdir / f".write_test.{uuid.uuid4().hex[:8]}"
    try:  # One line now rather than a traceback at the first save.
      workdir.mkdir(parents=True, exist_ok=True)
      probe.write_text("ok")
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-except
      return (f"--workdir={workdir} is not writable ({type(e).__name__}: "
              f"{checkpoint_facts.describe(e)}); pass a directory you can "
              "write to.")
    said = False
    for _ in range(5):
      flock = self._flock()
      if flock is None:
        continue
      holder = self._holder()
      # A free flock on the same kernel: its holder is gone.
      gone = flock == "free" and (
          (holder or {}).get("boot_id") == self._me["boot_id"])
      if flock == "held" or (not gone and self._alive(holder)):
        self.release()
        holder = holder or {}
        return (f"{self.path.parent} is in use by another trainer (pid "
                f"{holder.get('pid')} on host {holder.get('host')}, started "
                f"{time.ctime(float(holder.get('started', 0)))}); wait for "
                "it to finish, or pass another --workdir. If that process "
                f"is gone, delete {self.path}.")
      if holder is not None and not said:
        progress.say(f"Taking over the lock of {self.path.parent} left by pid "
                     f"{holder.get('pid')} on host {holder.get('host')}, "
                     "which is no longer running.")
        said = True
      self._write()  # On a bucket, read back: the last writer wins.
      if self._local or (self._holder() or {}).get("token") == self.token:
        self.held = True
        return ""
    return f"Could not take the lock {self.path}; delete it and try again."

  def _flock(self) -> str | None:
    """Takes the flock of a local lock (creating the file): 'free' (ours
    now), 'held' (a live process holds it: the kernel drops a dead one's)
    or None if the file was removed meanwhile; '' on a bucket."""
    if not self._local:
      return ""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
        self._fd = fd
        return "free"
      flock = None  # Released and removed meanwhile.
    except FileNotFoundError:  # Removed meanwhile.
      flock = None
    except OSError:  # Held: its holder runs.
      flock = "held"
    os.close(fd)
    return flock

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        self._write()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    """Removes the lock if this process holds it."""
    self._stop.set()
    if self._thread not in (None, threading.current_thread()):
      self._thread.join(timeout=5)
    if self.held and (self._holder() or {}).get("token") == self.token:
      self.path.unlink(missing_ok=True)
    self.held = False
    if self._fd is not None:  # Drops the flock.
      os.close(self._fd)
      self._fd = None

