"""One trainer per workdir: WORKDIR/trainer.lock, held by the job's process 0.

The lock file is JSON naming its holder: host, pid, the kernel's boot id, the
process's start time (clock ticks since boot, so a reused pid is told
apart), its pid namespace, a token shared by every process of the job, and a
heartbeat time that a daemon thread refreshes every `HEARTBEAT_SECONDS`.
Whether a holder is alive is decided without trusting pids alone:

- A local workdir: the holder keeps an exclusive `flock` on the file for its
  lifetime, which the kernel drops when the process dies, whatever its pid
  namespace (a restarted container gets pid 1 again). On the same kernel
  (same boot id) a free flock means the holder is gone.
- The same kernel and pid namespace (also for buckets): the pid is alive
  with the recorded start time, or it is gone.
- Otherwise (another host, another container, or a bucket): the heartbeat.
  One older than `OLD_SECONDS` by this machine's clock is dead at once;
  else the lock is watched for up to `STALE_SECONDS` (three heartbeats): a
  heartbeat that moves is a live trainer (refused), one that does not is a
  dead one (taken over). No clocks are compared in that case, so a requeue
  onto another node resumes within about half a minute.

On a bucket the lock is created by writing it and reading it back (the
last writer wins: GCS's create-if-absent precondition is not reachable
through gcsfs, nor offered by the emulator the tests use); two trainers
started within the same second on one gs:// workdir are not told apart.

A takeover is said once. On several hosts process 0 takes the lock and
shares its token; if process 0 dies, the others remove the lock on their way
out (`release_for_job`), so a job never leaves it behind.
"""
import contextlib
import fcntl
import json
import os
import random
import socket
import threading
import time

import jax
from absl import logging
from etils import epath

from byol_jax.trainer import checkpoint
from byol_jax import progress
from byol_jax import storage
from byol_jax.trainer import workdir as workdir_lib
from byol_jax.errors import ConfigError

LOCK_NAME = "trainer.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 3 * HEARTBEAT_SECONDS   # A heartbeat that long unmoved: dead.
OLD_SECONDS = 600.0                      # Older than this by the clock: dead.
_POLL_SECONDS = 1.0
_RECORD_BYTES = 1024  # A local record, padded (see _write_local).


def _read(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return None


def boot_id() -> str | None:
  """The running kernel's boot id (Linux), the same in every container."""
  return _read("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> str | None:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def start_ticks(pid: int) -> int | None:
  """When process `pid` started (clock ticks since boot), or None if gone."""
  stat = _read(f"/proc/{pid}/stat")
  if not stat:
    return None
  return int(stat.rsplit(")", 1)[1].split()[19])  # Field 22 of stat.


class WorkdirLock:
  """The job's lock on WORKDIR (see the module docstring)."""

  def __init__(self, workdir: epath.Path):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._local = not storage.is_remote(self.path)
    self.token = 0  # The job's, shared by its processes (0: none).
    self._fd = None
    self._started = time.time()
    self._stop = threading.Event()
    self._thread = None
    self.held = False

  # -------------------------------------------------------------- records ----
  def _record(self) -> str:
    return json.dumps(dict(
        host=socket.gethostname(), pid=os.getpid(), boot_id=boot_id(),
        pid_ns=pid_namespace(), start_ticks=start_ticks(os.getpid()),
        token=self.token, started=self._started, heartbeat=time.time(),
        heartbeat_seconds=HEARTBEAT_SECONDS))

  def _holder(self) -> dict | None:
    """The lock's record; None if there is no lock, {} if unreadable."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    except OSError:
      return {}
    try:
      holder = json.loads(text)
    except ValueError:
      return {}  # Half written: its writer died while writing.
    return holder if isinstance(holder, dict) else {}

  # --------------------------------------------------------------- liveness ----
  def _same_processes(self, holder: dict) -> bool:
    return (bool(holder.get("boot_id")) and holder.get("boot_id") == boot_id()
            and holder.get("pid_ns") == pid_namespace())

  def _alive(self, holder: dict, flock: str) -> bool:
    """Whether the lock's holder runs (may watch it for STALE_SECONDS).

    Args:
      holder: its record ({} if unreadable).
      flock: 'held' (by another process), 'free' (we hold it now) or ''
        (a bucket: no flock).
    """
    if flock == "held":
      return True  # The kernel keeps a dead process's flock for no one.
    if not holder:
      return False  # Unreadable: written by a process that died writing.
    if flock == "free" and holder.get("boot_id") == boot_id():
      return False  # Its kernel would hold the flock for it.
    if self._same_processes(holder):
      ticks = start_ticks(int(holder.get("pid", -1)))
      return ticks is not None and ticks == holder.get("start_ticks")
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)) or time.time() - beat > OLD_SECONDS:
      return False
    # Watch the heartbeat: a live holder moves it within one interval.
    deadline = time.monotonic() + STALE_SECONDS
    while time.monotonic() < deadline:
      time.sleep(_POLL_SECONDS)
      now = self._holder()
      if now is None:
        return False  # Released meanwhile.
      if now and (now.get("heartbeat") != beat or
                  now.get("token") != holder.get("token")):
        return True
    return False

  # ---------------------------------------------------------------- acquire ----
  def acquire(self) -> None:
    """Takes the lock on process 0 and shares the decision and the token.

    Raises:
      ConfigError: on every process, when process 0 refuses.
    """
    refusal = ""
    if jax.process_index() == 0:
      # 31 bits: shared as an int32 (JAX without x64).
      self.token = random.getrandbits(31) or 1
      refusal = self._try_acquire()
    token = checkpoint.shared_decision(0 if refusal else self.token)
    if not token:
      raise ConfigError(refusal or f"{self.path.parent} is in use by another "
                        "trainer (see process 0's error).")
    self.token = token
    if self.held:
      self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="workdir-lock-heartbeat")
      self._thread.start()

  def _try_acquire(self) -> str:
    try:
      workdir_lib.check_writable(self.path.parent)
    except ConfigError as e:
      return str(e)
    said = False
    for _ in range(5):
      state, holder, flock = self._claim()
      if state == "ours":
        return ""
      if state == "retry":
        continue
      if self._alive(holder, flock):
        self._unclaim()
        return (f"{self.path.parent} is in use by another trainer (pid "
                f"{holder.get('pid')} on host {holder.get('host')}, started "
                f"{time.ctime(float(holder.get('started', 0)))}); wait for "
                "it to finish, or pass another --workdir. If that process "
                f"is gone, delete {self.path}.")
      if not said:
        progress.say(f"Taking over the lock of {self.path.parent} left by pid "
                     f"{holder.get('pid')} on host {holder.get('host')}, "
                     "which is no longer running.")
        said = True
      if self._take_over(holder):
        return ""
    return f"Could not take the lock {self.path}; delete it and try again."

  def _claim(self) -> tuple[str, dict, str]:
    """Creates the lock if there is none.

    Returns:
      (state, holder, flock): state 'ours' (created; locally flocked),
      'retry' (it changed meanwhile) or 'found' (holder: the record found;
      flock as `_alive` takes it).
    """
    if not self._local:
      holder = self._holder()
      if holder is None:
        self.path.write_text(self._record())  # Then read back: last wins.
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
          self.held = True
          return "ours", {}, ""
      return ("retry", {}, "") if holder is None else ("found", holder, "")
    path = os.fspath(self.path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # A live process holds it.
      os.close(fd)
      return "found", self._holder() or {}, "held"
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
      same = False
    if not same:
      os.close(fd)  # Released and removed meanwhile: try again.
      return "retry", {}, ""
    self._fd = fd
    text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    if not text:
      self._write_local()
      self.held = True
      return "ours", {}, ""
    try:
      holder = json.loads(text)
    except ValueError:
      holder = {}
    return "found", (holder if isinstance(holder, dict) else {}), "free"

  def _unclaim(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def _take_over(self, holder: dict) -> bool:
    if self._local:
      self._write_local()
      self.held = True
      return True
    if self._holder() != holder:
      return False  # It changed meanwhile: decide again.
    self.path.unlink(missing_ok=True)
    return False  # Create it afresh (the next round of _try_acquire).

  def _write_local(self) -> None:
    """The record, padded to a fixed size and written over the old one in
    one write: a reader never sees it empty or half-written."""
    data = self._record().encode().ljust(_RECORD_BYTES)
    os.pwrite(self._fd, data, 0)

  # -------------------------------------------------------------- heartbeat ----
  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        if self._local:
          self._write_local()
        else:
          self.path.write_text(self._record())
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not refresh %s: %s", self.path, e)

  # ---------------------------------------------------------------- release ----
  def release(self) -> None:
    """Removes the lock if this process holds it."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=5)
    if self.held:
      self._remove_if_ours()
      self.held = False
    self._unclaim()

  def release_for_job(self) -> None:
    """On any process: removes the lock if it still names this job (used
    when the job is lost, e.g. process 0 died without releasing it)."""
    if self.held:
      self.release()
    elif self.token:
      with contextlib.suppress(Exception):
        self._remove_if_ours()

  def _remove_if_ours(self) -> None:
    holder = self._holder()
    if holder and holder.get("token") == self.token:
      self.path.unlink(missing_ok=True)
