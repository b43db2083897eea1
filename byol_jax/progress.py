"""The commands' console: one line per event, rates measured after compiling.

Only process 0 prints. The first step of a run includes compiling the train
step, so images/s and the ETA count from the end of the first step. Long
phases (decoding a dataset, an evaluation's passes and steps) print a line
with their rate and ETA at most every PERIOD_S seconds (`Ticker`, `track`).
"""
import threading
import time
from typing import Iterable, Iterator, TypeVar

import jax
import ml_collections

# Seconds between two progress lines of a long phase (start-up decoding,
# evaluations): no phase runs longer than this without a line.
PERIOD_S = 10.0
_T = TypeVar("_T")


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def say(text: str) -> None:
  """Prints one line on process 0."""
  if jax.process_index() == 0:
    print(text, flush=True)


def describe_run(config: ml_collections.ConfigDict, dataset: str,
                 total_steps: int, steps_per_epoch: int, workdir) -> str:
  """The start-up summary line."""
  m = config.model
  net = f"ResNet-{m.depth}" + (f" x{m.width}" if m.width != 1 else "")
  if m.num_filters != 64:
    net += f" ({m.num_filters} filters)"
  devices = jax.devices()
  return (f"{config.method} on {dataset}: {net}, {m.stem} stem, "
          f"{config.data.image_size} px, batch {config.batch_size} on "
          f"{len(devices)} {devices[0].platform} device(s) in "
          f"{jax.process_count()} process(es); {total_steps} steps "
          f"({steps_per_epoch} per epoch) -> {workdir}")


class Progress:
  """Images per second and ETA of the steps after the first one."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int,
               steps_per_epoch: int):
    self._total, self._batch = total_steps, batch_size
    self._per_epoch = max(steps_per_epoch, 1)
    self._start = time.monotonic()
    self._t0 = self._s0 = None
    self._start_step = start_step
    self.compile_seconds = 0.0

  @property
  def start_step(self) -> int:
    return self._start_step

  @property
  def measuring(self) -> bool:
    return self._t0 is not None

  def first_step_done(self, step: int) -> None:
    """Call once, after the first step's outputs are ready."""
    self._t0, self._s0 = time.monotonic(), step
    self.compile_seconds = self._t0 - self._start

  def rate(self, step: int) -> float | None:
    """Images per second since the first step (None: nothing measured yet)."""
    if self._t0 is None or step <= self._s0:
      return None
    return (step - self._s0) * self._batch / (time.monotonic() - self._t0)

  def line(self, step: int, m: dict) -> str:
    """'step 10/60 ep 0.83 loss ... img/s ... eta ...'."""
    rate = self.rate(step)
    speed = (f"img/s {rate:.1f} eta "
             f"{format_duration((self._total - step) * self._batch / rate)}"
             if rate else "img/s - eta -")
    parts = [f"step {step}/{self._total}", f"ep {step / self._per_epoch:.2f}",
             f"loss {m['loss']:.4f}", f"lr {m['lr']:.4g}"]
    if "tau" in m:
      parts.append(f"tau {m['tau']:.5f}")
    if "classifier_accuracy" in m:
      parts.append(f"cls_acc {m['classifier_accuracy']:.3f}")
    parts.append(f"emb_std {m['embedding_std']:.4f}")
    if m.get("undecodable_images"):
      parts.append(f"undecodable {int(m['undecodable_images'])}")
    parts.append(speed)
    return " ".join(parts)

  def summary(self, step: int, final: dict) -> str:
    """The last line of a run."""
    elapsed = time.monotonic() - self._start
    text = (f"done: steps {self._start_step}-{step} in "
            f"{format_duration(elapsed)} (compiling "
            f"{format_duration(self.compile_seconds)})")
    if "loss" in final:
      text += f", final loss {final['loss']:.4f}"
    if final.get("undecodable_images"):
      text += (f", {int(final['undecodable_images'])} undecodable images "
               "replaced")
    evals = " ".join(f"{k.split('/')[-1]} {100 * v:.2f}%"
                     for k, v in sorted(final.items())
                     if k.startswith("eval/"))
    return text + (f", {evals}" if evals else "")


def single_class_warning(dataset: str) -> str:
  """The line for labelled data of one class (accuracy is then 100%)."""
  return (f"warning: {dataset} has a single class: every accuracy (online "
          "classifier, kNN, linear) is 100% and means nothing here; give "
          "the data two or more classes to measure anything.")


def eval_line(step: int, results: dict) -> str:
  text = " ".join(f"{k.split('/')[-1]} {100 * v:.2f}%"
                  for k, v in sorted(results.items()))
  return f"step {step} eval: {text}"


class Ticker:
  """Progress of a long phase: 'WHAT: 40/100 UNIT (2.1 UNIT/s, eta 0m29s)'.

  `tick(done)` (or `add(n)` from several threads) prints a line when PERIOD_S
  seconds have passed since the last one, so short phases print nothing.
  The rate counts from the first tick, after any compiling before it.
  """

  def __init__(self, what: str, total: int, unit: str = "steps"):
    self._what, self._total, self._unit = what, int(total), unit
    self._start = self._last = time.monotonic()
    self._t0 = self._d0 = None
    self._done = 0
    self._lock = threading.Lock()
    self.printed = 0

  def add(self, n: int = 1) -> None:
    """Counts n more done (thread-safe)."""
    with self._lock:
      self._done += n
      self.tick(self._done)

  def tick(self, done: int, extra: str = "") -> None:
    """Reports `done` of the total; prints if PERIOD_S passed since the last."""
    now = time.monotonic()
    if self._t0 is None:
      self._t0, self._d0 = now, done
      return
    if now - self._last < PERIOD_S or done >= self._total:
      return
    self._last = now
    rate = (done - self._d0) / max(now - self._t0, 1e-9)
    eta = (format_duration((self._total - done) / rate) if rate > 0
           else "-")
    self.printed += 1
    say(f"{self._what}: {done}/{self._total} {self._unit} ({rate:.3g} "
        f"{self._unit}/s, eta {eta}){' ' + extra if extra else ''}")

  def finish(self, text: str | None = None) -> None:
    """A closing line, only if the phase took long enough to report."""
    elapsed = time.monotonic() - self._start
    if self.printed or elapsed >= PERIOD_S:
      say(text or f"{self._what}: {self._total} {self._unit} in "
          f"{format_duration(elapsed)}")


def track(items: Iterable[_T], what: str, total: int | None = None,
          unit: str = "batches") -> Iterator[_T]:
  """Yields `items`, with a `Ticker` line at most every PERIOD_S seconds."""
  total = len(items) if total is None else total  # type: ignore[arg-type]
  ticker = Ticker(what, total, unit)
  for i, item in enumerate(items, 1):
    yield item
    ticker.tick(i)
  ticker.finish()
