"""SIGTERM at any moment ends a run within seconds (a notice gives ~30 s).

Python's handlers cannot run while the main thread is in one long C++ call
(compiling, restoring): `Guard` routes SIGTERM through `set_wakeup_fd` to a
watcher thread. In the loop a SIGTERM only sets `requested`, which the
checkpointer's save policy reads after the next step; while the main
thread is `busy(...)`, the watcher saves a newer state if one is registered,
runs the exit callbacks and exits 143. On several processes JAX's notifier
owns SIGTERM: the watcher polls its coordination-service key instead (the
client is only reachable through `jax._src.distributed`).
"""
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

import jax

from byol_jax import progress

EXIT_PREEMPTED = 143
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # Set by JAX's notifier (tsl).
_POLL_SECONDS = 1.0


class Guard:
  """The watcher of one run (a context manager; one process only)."""

  def __init__(self):
    self.enabled = threading.current_thread() is threading.main_thread()
    self._several = jax.process_count() > 1
    self.requested = False
    self._mutex = threading.Lock()
    self._busy: str | None = None
    self._newer: tuple[int, Any] | None = None
    self._save: Callable[[int, Any], None] | None = None
    self._callbacks: list[Callable[[], None]] = []
    self._sockets = None
    self._previous = None

  def __enter__(self):
    if not self.enabled:
      return self
    self._sockets = socket.socketpair()  # Closed by __exit__: stops it.
    if self._several:
      threading.Thread(target=self._poll_notice, daemon=True,
                       name="preemption-notice-watcher").start()
      return self
    reader, writer = self._sockets
    writer.setblocking(False)
    self._previous = (
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False),
        signal.signal(signal.SIGTERM, self._on_sigterm))
    threading.Thread(target=self._watch, args=(reader,), daemon=True,
                     name="sigterm-watcher").start()
    return self

  def __exit__(self, *exc):
    if self._sockets is None:
      return
    if not self._several:
      signal.set_wakeup_fd(self._previous[0])
      signal.signal(signal.SIGTERM, self._previous[1])
    with self._mutex:  # The watcher is not acting: stop it.
      self._sockets[1].close()
      self._sockets = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def on_exit(self, fn: Callable[[], None]) -> None:
    """`fn` runs before the watcher ends the process (e.g. lock release)."""
    self._callbacks.append(fn)

  def saves_with(self, save: Callable[[int, Any], None]) -> None:
    """How the watcher saves a newer state: save(step, state), finished."""
    self._save = save

  @contextlib.contextmanager
  def busy(self, what: str, newer: tuple[int, Any] | None = None):
    """Marks a long call of the main thread; `newer`: (step, state) newer
    than the last checkpoint, saved on SIGTERM."""
    if not self.enabled:
      yield
      return
    with self._mutex:
      self._busy, self._newer = what, newer
    if self.requested:  # Already asked to stop: do not start it.
      self._stop()
    try:
      yield
    finally:
      with self._mutex:  # Blocks for good if the watcher is ending the run.
        self._busy = self._newer = None

  def _watch(self, reader: socket.socket) -> None:
    data = b"start"
    while data:  # b"": closed by __exit__.
      try:
        data = reader.recv(64)
      except OSError:
        return
      if signal.SIGTERM in data:
        self.requested = True
        self._stop()

  def _poll_notice(self) -> None:
    """Several processes: a preemption notice seen while busy ends it."""
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
    while self._sockets is not None and client is not None:
      time.sleep(_POLL_SECONDS)
      if self._busy is None:
        continue
      try:
        client.key_value_try_get(_NOTICE_KEY)
      except Exception:  # pylint: disable=broad-except  (not found: no notice)
        continue
      self.requested = True
      self._stop()

  def _stop(self) -> None:
    """Ends the run now if the main thread is busy; else leaves it be."""
    if not self._mutex.acquire(blocking=False):
      if threading.current_thread() is threading.main_thread():
        return  # The watcher holds it: it ends the process.
      self._mutex.acquire()
    if self._busy is None or self._sockets is None:
      self._mutex.release()
      return  # In the loop: the checkpointer reads `requested`.
    # Keeps the mutex: the main thread must not leave its busy call now.
    try:
      if self._newer is not None and self._save is not None:
        step, state = self._newer
        self._save(step, state)
        saved = f"saved step {step}"
      else:
        saved = "nothing newer than the last checkpoint to save"
      for fn in reversed(self._callbacks):
        fn()
      progress.say(f"Preempted while {self._busy}: {saved}; run the same "
                   "command to resume.")
    except BaseException as e:  # pylint: disable=broad-except
      print(f"error: preempted while {self._busy}, and finishing failed "
            f"({type(e).__name__}: {e}); run the same command to resume.",
            file=sys.stderr, flush=True)
    sys.stdout.flush()
    if self._several and jax.process_index() == 0:
      # Process 0 hosts the coordination service: the others, which see the
      # notice within a poll, leave first (else they stop as a lost job).
      time.sleep(3 * _POLL_SECONDS)
    os._exit(EXIT_PREEMPTED)  # pylint: disable=protected-access
