"""After a NaN/Inf stop: which checkpoint is healthy, and how to go on.

A finite checkpoint can already be diverging. Checkpoint N is healthy when
its logged `param_norm` is at most MAX_GROWTH times step 0's, or no logged
norm up to it jumped more than MAX_JUMP times the one before.
"""
import math
import os
import shlex
import shutil
import sys

import jax
import ml_collections
import numpy as np
from etils import epath

from byol_jax.trainer import metric_writer

MAX_GROWTH = 10.0
MAX_JUMP = 2.0
# Base learning rates of the papers' recipes (DESIGN.md): an advised rate
# is at most these, and at most a tenth of the rate that diverged.
_PUBLISHED_LR = {("byol", "linear"): 0.2, ("simclr", "linear"): 0.3,
                 ("simclr", "sqrt"): 0.075, ("simsiam", "linear"): 0.05}
# Flags a resume command replaces (with or without '=value').
_REPLACED = ("--restore_step", "--config.optimizer.base_lr", "--start_over",
             "--nostart_over", "--allow_changes")


def param_norm(params) -> float:
  """L2 norm of every parameter (host copy; once, at start-up)."""
  return math.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                       for x in jax.tree.leaves(jax.device_get(params))))


class Health:
  """Parameter norms by step, this run's and those in metrics.jsonl."""

  def __init__(self, workdir: epath.Path):
    self.norms = dict(metric_writer.logged(workdir, "param_norm"))

  def healthy(self, step: int) -> bool:
    """Whether checkpoint `step` is known not to be diverging (module doc)."""
    norm = self.norms.get(step)
    if norm is None or not math.isfinite(norm) or 0 not in self.norms:
      return False
    if norm <= MAX_GROWTH * self.norms[0]:
      return True
    chain = [self.norms[s] for s in sorted(self.norms) if s <= step]
    return all(b <= MAX_JUMP * a for a, b in zip(chain, chain[1:]))


def lower_lr(config: ml_collections.ConfigDict) -> float:
  """A tenth of config's base_lr, at most the method's published one."""
  published = _PUBLISHED_LR.get(
      (config.method, config.optimizer.get("lr_scaling", "linear")), np.inf)
  return float(f"{min(config.optimizer.base_lr / 10, published):.3g}")


def resume_flags(config: ml_collections.ConfigDict, health: Health,
                 saved: list[int]) -> tuple[list[str], str]:
  """(The flags that resume or start over at a lower LR, the reason)."""
  lr = lower_lr(config)
  good = [s for s in saved if health.healthy(s)]
  if good:
    why = (f"checkpoint {good[-1]} is the newest whose weights are not "
           "diverging" + (f" (newer ones {[s for s in saved if s > good[-1]]}"
                          " are finite but grew past "
                          f"{MAX_GROWTH:g}x their initial norm)"
                          if good[-1] != saved[-1] else ""))
    return [f"--restore_step={good[-1]}",
            f"--config.optimizer.base_lr={lr:g}",
            "--allow_changes=optimizer.base_lr"], why
  why = ("no checkpoint is known to be healthy" + (
      f" (steps {saved} are finite but their weights grew past "
      f"{MAX_GROWTH:g}x their initial norm)" if saved else
      " (none was saved before it)"))
  return ["--start_over", f"--config.optimizer.base_lr={lr:g}"], why


def command(argv: list[str], flags: list[str]) -> str:
  """The trainer's command line `argv` with `flags` in place of their kind
  (`--allow_changes` lists are joined)."""
  python = os.path.basename(sys.executable)
  if shutil.which(python) != sys.executable:
    python = sys.executable
  kept, allow, args = [], [], list(argv[1:])
  while args:
    arg = args.pop(0)
    name, has_value, value = arg.partition("=")
    if name not in _REPLACED:
      kept.append(arg)
      continue
    if not has_value and name not in ("--start_over", "--nostart_over"):
      value = args.pop(0) if args else ""    # '--flag VALUE'.
    if name == "--allow_changes" and value:
      allow += value.split(",")
  new = []
  for flag in flags:
    name, _, value = flag.partition("=")
    if name == "--allow_changes":  # Both lists, each field once.
      flag = f"{name}={','.join(dict.fromkeys(allow + value.split(',')))}"
    new.append(flag)
  return shlex.join([python, "-m", "byol_jax.train", *kept, *new])
