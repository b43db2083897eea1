"""Ctrl-C in the training loop: the loop stops between two steps.

Python's default handler raises KeyboardInterrupt wherever the main thread
is, which can be inside a save; and while Orbax runs a save's asyncio loop,
asyncio swaps in its own SIGINT handler, which can drop the interrupt (a
Ctrl-C that the trainer then ignored was seen in the tests). Inside the loop
Ctrl-C is only recorded, and the loop raises KeyboardInterrupt after the
step; a second Ctrl-C raises at once.
"""
import signal
import threading


class DeferredCtrlC:
  """Context manager: `requested` is set by Ctrl-C while it is entered.

  Installed only in the main thread and only over Python's default handler
  (an ignored SIGINT, e.g. a background job, or a notebook's own handler is
  left alone).
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if (threading.current_thread() is threading.main_thread() and
        signal.getsignal(signal.SIGINT) is signal.default_int_handler):
      self._previous = signal.signal(signal.SIGINT, self._on_sigint)
    return self

  def _on_sigint(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, exc_type, exc, tb):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None
