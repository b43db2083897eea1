"""The commands' console (process 0): one line per event; long phases print
their rate and ETA at most every PERIOD_S seconds (`Ticker`, `track`)."""
import threading
import time
from typing import Iterable, Iterator, TypeVar

import jax
import ml_collections

PERIOD_S = 10.0  # No long phase runs longer than this without a line.
_T = TypeVar("_T")
# What a progress line shows of the metrics, when they are there.
_SHOWN = (("epoch", "ep", ".2f"), ("loss", "loss", ".4f"), ("lr", "lr", ".4g"),
          ("tau", "tau", ".5f"),
          ("classifier_accuracy", "cls_acc", ".3f"),
          ("embedding_std", "emb_std", ".4f"),
          ("undecodable_images", "undecodable", ".0f"))


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
  """Images/s and ETA after the first (compiling) step; the elapsed time
  goes on from `elapsed_before` (earlier starts')."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int,
               elapsed_before: float = 0.0):
    self.start_step, self._total = start_step, total_steps
    self._batch, self._before = batch_size, elapsed_before
    self._start = time.monotonic()
    self._t0 = self._s0 = None
    self.compile_seconds = 0.0

  def first_step_done(self, step: int) -> None:
    """Call once, after the first step's outputs are ready."""
    self._t0, self._s0 = time.monotonic(), step
    self.compile_seconds = self._t0 - self._start

  def times(self, step: int) -> dict[str, float]:
    """images_per_sec (0 until measured), elapsed_seconds, eta_seconds."""
    now = time.monotonic()
    out = dict(images_per_sec=0.0,
               elapsed_seconds=self._before + now - self._start)
    if self._t0 is not None and step > self._s0:
      steps_per_sec = (step - self._s0) / (now - self._t0)
      out.update(images_per_sec=steps_per_sec * self._batch,
                 eta_seconds=(self._total - step) / steps_per_sec)
    return out

  def line(self, step: int, m: dict) -> str:
    """'step 10/60 ep 0.83 loss ... img/s ... elapsed ... eta ...'."""
    parts = [f"step {step}/{self._total}"] + [
        f"{name} {m[key]:{spec}}" for key, name, spec in _SHOWN if key in m]
    measured = "eta_seconds" in m
    parts += ["img/s", f"{m['images_per_sec']:.1f}" if measured else "-",
              "elapsed", format_duration(m["elapsed_seconds"]), "eta",
              format_duration(m["eta_seconds"]) if measured else "-"]
    return " ".join(parts)

  def summary(self, step: int, final: dict) -> str:
    """The last line of a run."""
    elapsed = time.monotonic() - self._start
    text = (f"done: steps {self.start_step}-{step} in "
            f"{format_duration(elapsed)} (compiling "
            f"{format_duration(self.compile_seconds)})")
    if self._before:
      text += f", {format_duration(self._before + elapsed)} in all"
    if "loss" in final:
      text += f", final loss {final['loss']:.4f}"
    if final.get("undecodable_images"):
      text += (f", {int(final['undecodable_images'])} undecodable images "
               "replaced")
    evals = _percentages({k: v for k, v in final.items()
                          if k.startswith("eval/")})
    return text + (f", {evals}" if evals else "")


def single_class_warning(dataset: str) -> str:
  """The line for labelled data of one class (accuracy is then 100%)."""
  return (f"warning: {dataset} has a single class: every accuracy (online "
          "classifier, kNN, linear) is 100% and means nothing here; give "
          "the data two or more classes to measure anything.")


def _percentages(results: dict) -> str:
  return " ".join(f"{k.split('/')[-1]} {100 * v:.2f}%"
                  for k, v in sorted(results.items()))


def eval_line(step: int, results: dict) -> str:
  return f"step {step} eval: {_percentages(results)}"


class Ticker:
  """A long phase's 'WHAT: 40/100 UNIT (2.1 UNIT/s, eta 0m29s)' lines, at
  most every PERIOD_S s; the rate counts from the first tick."""

  def __init__(self, what: str, total: int, unit: str = "steps"):
    self._what, self._total, self._unit = what, int(total), unit
    self._start = self._last = time.monotonic()
    self._t0 = self._d0 = None
    self._done = 0
    self._lock = threading.Lock()
    self._printed = 0

  def add(self, n: int = 1) -> None:
    """Counts n more done (thread-safe)."""
    with self._lock:
      self._done += n
      self.tick(self._done)

  def tick(self, done: int, extra: str = "") -> None:
    """Reports `done` of the total."""
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
    self._printed += 1
    say(f"{self._what}: {done}/{self._total} {self._unit} ({rate:.3g} "
        f"{self._unit}/s, eta {eta}){' ' + extra if extra else ''}")

  def finish(self) -> None:
    """A closing line, only if the phase took long enough to report."""
    elapsed = time.monotonic() - self._start
    if self._printed or elapsed >= PERIOD_S:
      say(f"{self._what}: {self._total} {self._unit} in "
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
