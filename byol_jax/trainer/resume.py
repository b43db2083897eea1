"""Where a run starts: which checkpoint, checked against the config first.

A config change that alters the state or the run is refused (nothing
moved); only real damage moves a checkpoint aside, then the next older one
is tried. A workdir with checkpoints, or whose checkpoints were all
quarantined, starts again from step 0 only with `start_over`.
"""
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from byol_jax.errors import ConfigError
from byol_jax.trainer import checkpoint
from byol_jax.trainer import checkpoint_facts
from byol_jax.trainer import config_lib
from byol_jax.trainer import multihost

# Fields a resumed run may change: cadences, evaluation settings, the length
# of the run and where the same data lives. The name of a folder or file
# (data.name, not read for them) follows data.path.
RESUMABLE = ("log_every_steps", "eval_every_steps", "eval_batch_size",
             "checkpoint_every_steps", "checkpoint_every_minutes",
             "keep_checkpoints", "total_steps",
             "num_epochs", "knn.", "data.path", "data.data_dir",
             "data.num_parallel_calls", "data.cache", "data.skip_corrupt",
             "data.max_undecodable_fraction", "data.canvas_size")
# Fields that shape the state: no flag lets a resumed run change them.
STRUCTURAL = ("method", "model.", "projector.", "predictor.",
              "data.num_classes", "data.image_size", "optimizer.name",
              "optimizer.fixed_lr_predictor", "optimizer.classifier",
              "optimizer.clip_lr")
_SUPERSEDED = "checkpoints_superseded"
_DAMAGED = "checkpoints_damaged"


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'optimizer.lr': value} of a config (lists are values)."""
  return checkpoint_facts.flat(config_lib.config_to_json(config),
                               is_leaf=lambda x: not isinstance(x, dict))


def _matches(key: str, prefixes) -> bool:
  """Whether `key` is one of `prefixes` or lies under one ('model.')."""
  return any((key + ".").startswith(p.rstrip(".") + ".") for p in prefixes)


def config_changes(saved: ml_collections.ConfigDict,
                   current: ml_collections.ConfigDict,
                   allow: tuple[str, ...] = ()) -> tuple[dict, dict]:
  """(refused, allowed) differences {field: (saved, current)}; fields the
  saved config lacks count as their default. `allow` names fields or
  prefixes ('optimizer') changed on purpose; those shaping the state stay
  refused."""
  defaults = _flat(config_lib.base_config())
  old, new = _flat(saved), _flat(current)
  refused, allowed = {}, {}
  for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
    if a != b:
      resumable = _matches(key, RESUMABLE) or (
          _matches(key, allow) and not _matches(key, STRUCTURAL)) or (
              key == "data.name" and new.get("data.source") != "tfds")
      (allowed if resumable else refused)[key] = (a, b)
  return refused, allowed


def check_config(saved: ml_collections.ConfigDict,
                 current: ml_collections.ConfigDict, where: str,
                 allow: tuple[str, ...] = ()) -> dict:
  """Raises ConfigError for refused changes; returns the allowed ones."""
  refused, allowed = config_changes(saved, current, allow)
  if refused:
    # Every field: a fix that names only some is refused again.
    what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
    fix = " ".join(f"--config.{k}=" + (
        "'(" + ",".join(map(str, a)) + ")'" if isinstance(a, list) else
        str(a)) for k, (a, _) in refused.items())
    more = f" ({len(refused)} fields)" if len(refused) > 1 else ""
    also = (f", or keep the new values on purpose with --allow_changes="
            f"{','.join(refused)}" if not any(
                _matches(k, STRUCTURAL) for k in refused) else "")
    raise ConfigError(
        f"{where} was trained with another config: {what}{more}. Start a new "
        f"run with another --workdir, or resume this one with {fix}{also}.")
  return allowed


def check_allowed(allow: tuple[str, ...]) -> None:
  """Raises ConfigError for --allow_changes entries that change nothing a
  resumed run may change: unknown fields, or fields that shape the state."""
  fields = list(_flat(config_lib.base_config()))
  for entry in allow:
    covered = [k for k in fields if _matches(k, (entry,))]
    if not covered:
      raise ConfigError(f"--allow_changes={entry}: no config field is called"
                        f" {entry!r} (see byol_jax/trainer/config_lib.py).")
    if all(_matches(k, STRUCTURAL) for k in covered):
      raise ConfigError(
          f"--allow_changes={entry}: {entry} shapes the train state (or "
          "what it means), so a resumed run cannot change it; start a new "
          "run with another --workdir, or resume with the checkpoint's "
          "value.")


def restore_or_init(ckpt: checkpoint.Checkpointer,
                    config: ml_collections.ConfigDict, abstract_state: Any,
                    init: Callable[[], Any], restore_step: int | None = None,
                    say: Callable[[str], None] = print,
                    allow: tuple[str, ...] = (),
                    start_over: bool = False) -> tuple[Any, int]:
  """(state, step) to start from: restored, or `init()` in a new workdir.

  Args:
    restore_step: resume from this checkpoint, not the newest; newer ones
      move to WORKDIR/checkpoints_superseded/ (as all do with `start_over`).
    say: where the one-line notices go.
    allow: fields the user changes on purpose (see `config_changes`).
    start_over: train from step 0 on purpose (the only way to restart a
      workdir whose checkpoints were all quarantined).

  Raises:
    ConfigError: a refused config change, a missing or damaged
      --restore_step, or no readable checkpoint in the workdir.
    StorageError: the storage keeps failing.
  """
  check_allowed(allow)
  # Process 0's listing decides; every process then walks the same steps.
  steps = ckpt.all_steps()
  newest = multihost.shared_decision(max(steps, default=-1))
  steps = [s for s in steps if s <= newest]
  if start_over and restore_step is not None:
    raise ConfigError("--start_over trains from step 0: drop "
                      f"--restore_step={restore_step}.")
  if restore_step is not None and restore_step not in steps:
    raise ConfigError(f"--restore_step={restore_step}: no such checkpoint "
                      f"in {ckpt.directory}; available steps: {steps}.")
  if start_over:
    say("Starting over on purpose (--start_over)" + (
        f": the checkpoints {steps} were moved to "
        f"{ckpt.move_aside(steps, _SUPERSEDED)}." if steps else "."))
    return init(), 0
  for step in [restore_step] if restore_step is not None else steps[::-1]:
    why, state = "", None
    try:
      allowed = check_config(ckpt.saved_config(step), config,
                             f"{ckpt.directory}/{step}", allow)
      state = ckpt.restore(abstract_state, step)
    except checkpoint_facts.DamagedCheckpointError as e:
      why = str(e)
    if multihost.all_processes_ok(not why):
      newer = [s for s in steps if s > step and restore_step is not None]
      if newer:  # Another trajectory now: kept, out of the way.
        say(f"Resuming from step {step}: the newer checkpoints {newer} were "
            f"moved to {ckpt.move_aside(newer, _SUPERSEDED)}.")
      if allowed and jax.process_index() == 0:
        say("Resuming with changed settings: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in allowed.items()) + ".")
      return state, step
    dst = ckpt.move_aside([step], _DAMAGED)
    logging.warning("Checkpoint %d is damaged (%s); moved it to %s.", step,
                    why or "unreadable on another process", dst)
    if restore_step is not None:
      raise ConfigError(
          f"--restore_step={restore_step}: the checkpoint is damaged ({why});"
          f" it was moved to {_DAMAGED}/. Pick another step.")
  damaged = _quarantined(ckpt)
  if not steps and not multihost.shared_decision(len(damaged)):
    return init(), 0  # A new workdir.
  raise ConfigError(
      f"Every checkpoint of {ckpt.directory.parent} is damaged (steps "
      f"{damaged}, moved to {ckpt.directory.parent}/{_DAMAGED}/); the run "
      "does not start again from step 0 by itself: pass --start_over to "
      "train this workdir from step 0 on purpose, or use another --workdir.")


def _quarantined(ckpt: checkpoint.Checkpointer) -> list[int]:
  """Steps of the checkpoints in WORKDIR/checkpoints_damaged/ (<step>-<t>)."""
  folder = ckpt.directory.parent / _DAMAGED
  names = [p.name.split("-")[0] for p in folder.iterdir()
           ] if folder.is_dir() else []
  return sorted(int(n) for n in names if n.isdigit())
