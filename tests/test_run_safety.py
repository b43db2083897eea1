"""A run is never lost: resume checks, sound checkpoints, safe exits (issue 11).

In-process runs of `train.train_and_evaluate` on the tiny config, except
where the exit code or the absence of a traceback is the point.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import chex
import jax
import numpy as np
import pytest

from byol_jax import checkpoint
from byol_jax import checksums
from byol_jax import pretrained
from byol_jax import train
from byol_jax import workdir as workdir_lib
from byol_jax.errors import ConfigError
from testlib import REPO, checkpoint_steps, error_lines, train_env


def _config(tiny_config, steps=6, **overrides):
  overrides.setdefault("checkpoint_every_steps", 2)
  overrides.setdefault("log_every_steps", 2)
  overrides.setdefault("knn__enabled", False)
  return tiny_config(total_steps=steps, **overrides)


def _tree(workdir) -> dict[str, bytes | None]:
  """Every path under the workdir (bytes for files) except event files."""
  root = pathlib.Path(workdir)
  return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(root.rglob("*")) if "tfevents" not in p.name
          and p.name != "metrics.jsonl"}


def _no_tmp(workdir) -> None:
  leftovers = [p for p in pathlib.Path(workdir).rglob("*") if "tmp" in p.name
               and p.name.endswith(("-tmp", ".tmp")) or
               "orbax-checkpoint-tmp" in p.name]
  assert not leftovers, leftovers


def _all_finite(workdir) -> None:
  for step in checkpoint_steps(workdir):
    _, state, _ = pretrained.load_run(str(workdir), step)
    for leaf in jax.tree.leaves(state):
      leaf = np.asarray(leaf)
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.isfinite(leaf).all(), f"step {step} holds NaN/Inf"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_config):
  """A 6-step in-process run with checkpoints at 2, 4, 6."""
  workdir = tmp_path_factory.mktemp("safety") / "run"
  train.train_and_evaluate(_config(tiny_config), str(workdir))
  assert checkpoint_steps(workdir) == [2, 4, 6]
  return workdir


@pytest.fixture
def run_copy(base_run, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(base_run, dst)
  (dst / workdir_lib.LOCK_NAME).unlink(missing_ok=True)
  return dst


# ------------------------------------------------------ config on resume ----
def test_changed_model_is_refused_and_nothing_moves(run_copy, tiny_config):
  before = _tree(run_copy)
  config = _config(tiny_config, steps=8, model__num_filters=8, seed=3)
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config, str(run_copy))
  msg = str(e.value)
  assert "\n" not in msg
  assert "model.num_filters 4 -> 8" in msg and "seed 0 -> 3" in msg
  assert "--workdir" in msg and "--config.model.num_filters=4" in msg
  assert "--config.seed=0" in msg
  assert _tree(run_copy) == before  # Nothing moved, renamed or deleted.


def test_checkpoint_of_another_layout_is_refused_in_one_line(
    run_copy, tiny_config, monkeypatch):
  """A checkpoint whose state tree is not the one this version builds (as
  an older byol_jax's, whose BYOL heads had an output bias) is refused in
  one line naming a difference, before anything is compiled or moved."""
  from byol_jax import models  # pylint: disable=g-import-not-at-top
  from byol_jax.methods import byol  # pylint: disable=g-import-not-at-top
  make_network = byol.make_network

  def with_output_bias(config):  # This run's network with biased heads.
    net = make_network(config)
    return net.clone(projector=net.projector.clone(output_bias=True),
                     predictor=net.predictor.clone(output_bias=True))
  monkeypatch.setattr(byol, "make_network", with_output_bias)
  assert models.MLP(4, 4).output_bias is False
  before = _tree(run_copy)
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(_config(tiny_config, steps=8), str(run_copy))
  msg = str(e.value)
  assert "\n" not in msg and "laid out differently" in msg
  assert "params/predictor/dense2/bias is missing" in msg, msg
  assert "--workdir" in msg and "load_encoder" in msg
  assert _tree(run_copy) == before


def test_allowed_changes_resume_and_are_said_once(run_copy, tiny_config,
                                                  capsys):
  config = _config(tiny_config, steps=8, log_every_steps=4,
                   checkpoint_every_steps=4)
  final = train.train_and_evaluate(config, str(run_copy))
  out = capsys.readouterr().out
  assert final["step"] == 8 and checkpoint_steps(run_copy)[-1] == 8
  assert out.count("Resuming with changed settings") == 1
  assert "total_steps 6 -> 8" in out and "log_every_steps 2 -> 4" in out
  assert "Resuming from step 6." in out


# ------------------------------------------------------------- damage -------
def _damage(workdir, step, how):
  files = sorted(p for p in (pathlib.Path(workdir) / "checkpoints" / str(step)
                             / "state").rglob("*") if p.is_file()
                 and "/d/" in str(p))
  assert files
  if how == "truncate":
    for f in files:
      f.write_bytes(f.read_bytes()[:7])
  elif how == "delete":
    for f in files:
      f.unlink()
  elif how == "flip":  # Bytes flipped inside the data of every chunk.
    for f in files:
      b = bytearray(f.read_bytes())
      for i in range(len(b) // 3, len(b) // 3 + 4):
        b[i] ^= 0x5A
      f.write_bytes(bytes(b))


def test_damaged_checkpoints_are_quarantined_and_an_older_one_used(
    run_copy, tiny_config):
  _damage(run_copy, 6, "truncate")
  _damage(run_copy, 4, "flip")
  config = _config(tiny_config, steps=6)
  final = train.train_and_evaluate(config, str(run_copy))
  assert final["step"] == 6
  moved = sorted(p.name.split("-")[0]
                 for p in (run_copy / "checkpoints_damaged").iterdir())
  assert moved == ["4", "6"]
  assert checkpoint_steps(run_copy) == [2, 4, 6]  # Trained again from 2.


def _state_at(workdir, step):
  _, state, _ = pretrained.load_run(str(workdir), step)
  return state, step


def test_checksums_see_one_ulp_and_swaps_but_not_the_layout():
  from byol_jax import sharding  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  tree = {"a": x, "n": np.arange(5, dtype=np.int32)}
  base = checksums.compute(tree)
  ulp = x.copy()
  ulp.flat[100] = np.nextafter(ulp.flat[100], np.inf)
  swapped = x.copy()
  swapped.flat[[3, 4]] = swapped.flat[[4, 3]]
  assert checksums.compute({**tree, "a": ulp})["['a']"] != base["['a']"]
  assert checksums.compute({**tree, "a": swapped})["['a']"] != base["['a']"]
  mesh = sharding.make_mesh()
  spread = jax.device_put(x, sharding.batch_sharding(mesh))
  assert checksums.compute({**tree, "a": spread}) == base


def test_checksum_mismatch_is_damage(tmp_path, tiny_config, monkeypatch):
  """Contents that decode but differ from what was saved are damage."""
  from byol_jax import methods, optim, sharding, train_state  # pylint: disable=g-import-not-at-top
  config = _config(tiny_config)
  mesh = sharding.make_mesh()
  model = methods.get(config.method).make_network(config)
  tx, _ = optim.build_optimizer(config, 6, 1)
  state = train_state.create(config, model, tx, mesh, True)
  real = checksums.compute
  # The bytes on disk will not match the checksums written beside them.
  monkeypatch.setattr(checksums, "compute", lambda t: {
      k: v ^ (1 if "stem_conv" in k else 0) for k, v in real(t).items()})
  with checkpoint.Checkpointer(str(tmp_path), config) as ckpt:
    ckpt.save(1, state)
  monkeypatch.setattr(checksums, "compute", real)
  abstract = train_state.abstract(config, model, tx, mesh, True)
  with checkpoint.Checkpointer(str(tmp_path), config) as ckpt:
    with pytest.raises(checkpoint.DamagedCheckpointError, match="checksums"):
      ckpt.restore(abstract, 1)


def test_transient_errors_are_retried_then_stop_without_moving(
    run_copy, tiny_config, monkeypatch):
  calls = []
  real = checkpoint.ocp.CheckpointManager.restore

  def flaky(self, *args, **kwargs):
    calls.append(1)
    if len(calls) <= 2:
      raise ConnectionError("UNAVAILABLE: storage timed out")
    return real(self, *args, **kwargs)

  monkeypatch.setattr(checkpoint, "_RETRY_SECONDS", 0.01)
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", flaky)
  config = _config(tiny_config, steps=6)
  assert train.train_and_evaluate(config, str(run_copy))["step"] == 6
  assert len(calls) >= 3  # Two failures, then it read.
  assert not (run_copy / "checkpoints_damaged").exists()

  def broken(self, *args, **kwargs):
    raise ConnectionError("UNAVAILABLE: storage is down")

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", broken)
  before = _tree(run_copy)
  with pytest.raises(checkpoint.StorageError, match="nothing was moved"):
    train.train_and_evaluate(config, str(run_copy))
  assert _tree(run_copy) == before


def test_all_damaged_stops_and_never_restarts_from_zero(run_copy,
                                                        tiny_config):
  for step, how in ((2, "delete"), (4, "truncate"), (6, "flip")):
    _damage(run_copy, step, how)
  with pytest.raises(ConfigError, match="does not start again from step 0"):
    train.train_and_evaluate(_config(tiny_config), str(run_copy))
  assert checkpoint_steps(run_copy) == []
  assert len(list((run_copy / "checkpoints_damaged").iterdir())) == 3


def test_restore_step_resumes_an_older_checkpoint(run_copy, tiny_config):
  newer, _ = _state_at(run_copy, 6)
  config = _config(tiny_config, checkpoint_every_steps=0)
  final = train.train_and_evaluate(config, str(run_copy), restore_step=2)
  assert final["step"] == 6
  # The newer checkpoints are kept whole, out of the new trajectory's way.
  assert checkpoint_steps(run_copy) == [2, 6]
  moved = sorted((run_copy / "checkpoints_superseded").iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["4", "6"]
  shutil.copytree(moved[1], run_copy.parent / "old" / "checkpoints" / "6")
  _, kept, _ = pretrained.load_run(str(run_copy.parent / "old"))
  chex.assert_trees_all_equal(kept, newer)
  with pytest.raises(ConfigError, match="available steps"):
    train.train_and_evaluate(config, str(run_copy), restore_step=3)


# ---------------------------------------------------------- NaN / Inf -------
def test_non_finite_state_is_never_saved(tmp_path, tiny_config):
  workdir = tmp_path / "nan"
  config = _config(tiny_config, steps=30, optimizer__base_lr=1e5,
                   warmup_epochs=0.0, log_every_steps=5,
                   checkpoint_every_steps=3, keep_checkpoints=30)
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(config, str(workdir))
  saved = checkpoint_steps(workdir)
  assert saved, "the state was finite for a few steps at least"
  _all_finite(workdir)
  _no_tmp(workdir)
  msg = str(e.value)
  assert "\n" not in msg and f"--restore_step={saved[-1]}" in msg
  assert f"steps {saved}" in msg
  # The advice works: a finite checkpoint with a sane learning rate, changed
  # on purpose (without --allow_changes it is refused). Here the weights grew
  # for every step of LR 1e5: the earliest checkpoint is the sound one.
  sane = _config(tiny_config, steps=saved[0] + 2, checkpoint_every_steps=1,
                 warmup_epochs=0.0, keep_checkpoints=30)
  with pytest.raises(ConfigError, match="--allow_changes=optimizer.base_lr"):
    train.train_and_evaluate(sane, str(workdir), restore_step=saved[0])
  final = train.train_and_evaluate(sane, str(workdir), restore_step=saved[0],
                                   allow_changes=("optimizer.base_lr",))
  assert final["step"] == saved[0] + 2 and np.isfinite(final["loss"])


# --------------------------------------------------------------- locks ------
def test_stale_lock_is_taken_over(run_copy, tiny_config, caplog):
  dead = subprocess.Popen(["true"])
  dead.wait()
  (run_copy / workdir_lib.LOCK_NAME).write_text(json.dumps(dict(
      host=os.uname().nodename, pid=dead.pid, token="x", started=0,
      heartbeat=time.time())))
  train.train_and_evaluate(_config(tiny_config, steps=6), str(run_copy))
  assert "no longer running" in caplog.text
  assert not (run_copy / workdir_lib.LOCK_NAME).exists()  # Released.


def test_live_lock_is_refused(run_copy, tiny_config):
  (run_copy / workdir_lib.LOCK_NAME).write_text(json.dumps(dict(
      host="other-host", pid=1234, token="x", started=time.time(),
      heartbeat=time.time())))
  before = _tree(run_copy)
  with pytest.raises(ConfigError, match="pid 1234 on host other-host"):
    train.train_and_evaluate(_config(tiny_config, steps=8), str(run_copy))
  assert _tree(run_copy) == before


# ------------------------------------------------------ bad workdirs --------
def test_workdir_that_is_a_file_or_unwritable(tmp_path, tiny_config):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(ConfigError, match="is a file"):
    train.train_and_evaluate(_config(tiny_config), str(f))
  with pytest.raises(ConfigError, match="not writable"):
    train.train_and_evaluate(_config(tiny_config), str(f / "run"))
  assert f.read_text() == "x"


@pytest.mark.parametrize("key,value,match", [
    ("total_steps", -5, "total_steps=-5 must be >= 0"),
    ("log_every_steps", 0, "log_every_steps=0 must be > 0"),
    ("checkpoint_every_steps", -1, "checkpoint_every_steps=-1"),
    ("data__eval_split", "nope", "nope"),
    ("data__train_split", "nope", "nope"),
    ("method", "moco", "Unknown method"),
    ("batch_size", 12, "not divisible by the 8 devices"),
    ("data__num_classes", 5, "num_classes"),
    ("data__canvas_size", 16, "canvas_size=16 is smaller than"),
    # No loss scaling: float16 is refused in one line that names bfloat16.
    ("model__dtype", "float16", "float16.*--config.model.dtype=bfloat16"),
    ("optimizer__classifier", "adam", "optimizer.classifier 'adam'"),
])
def test_bad_settings_fail_before_compiling(tmp_path, tiny_config, key, value,
                                            match):
  config = _config(tiny_config)
  *parents, leaf = key.split("__")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=match) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------- CLI exit paths -----
# The trainer's module run with SIGINT at Python's default handler: Ctrl-C
# as a terminal delivers it. A shell that runs the tests as a background job
# ignores SIGINT, and an ignored signal stays ignored in every child (a
# trainer that went on stepping after SIGINT, seen in `.ci/run` started with
# `&`). Set in the child's Python, not in a preexec_fn (fork of a threaded
# process).
_WITH_SIGINT = ("import runpy, signal; "
                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('byol_jax.train', run_name='__main__', "
                "alter_sys=True)")


def _start(train_cmd, workdir, *extra):
  cmd = train_cmd(workdir, "steps=100000", "--config.log_every_steps=1",
                  "--config.checkpoint_every_steps=3",
                  "--config.knn.enabled=False", *extra)
  assert cmd[1:3] == ["-m", "byol_jax.train"], cmd
  return subprocess.Popen(
      [cmd[0], "-c", _WITH_SIGINT, *cmd[3:]], cwd=REPO, env=train_env(2),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, n):
  seen = 0
  for line in proc.stdout:
    if line.startswith("step ") and "/" in line.split()[1]:
      seen += 1
      if seen == n:
        return
  raise AssertionError(f"the trainer stopped early: {proc.communicate()}")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143),
                                      (signal.SIGINT, 130)])
def test_signals_leave_finished_checkpoints(tmp_path, train_cmd, sig, code):
  workdir = tmp_path / "run"
  proc = _start(train_cmd, workdir)
  _wait_for_step(proc, 4)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  assert "Traceback" not in err, err[-3000:]
  saved = checkpoint_steps(workdir)
  assert saved, err[-2000:]
  _no_tmp(workdir)
  assert not (workdir / workdir_lib.LOCK_NAME).exists()
  assert proc.returncode == code, err[-2000:]
  if sig == signal.SIGTERM:  # Preempted: saved the step reached, said so.
    assert f"Preempted: saved step {saved[-1]}" in out
    assert saved[-1] >= 4
  else:
    assert len(error_lines(err)) == 1 and "interrupted" in err


def test_second_trainer_is_refused_while_the_first_runs(tmp_path, train_cmd):
  workdir = tmp_path / "run"
  first = _start(train_cmd, workdir)
  try:
    _wait_for_step(first, 1)
    second = subprocess.run(
        train_cmd(workdir, "steps=10", "--config.seed=7"), cwd=REPO,
        env=train_env(2), capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    errors = error_lines(second.stderr)
    assert len(errors) == 1 and f"pid {first.pid}" in errors[0], second.stderr
    assert first.poll() is None  # The first one trains on.
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
  assert first.returncode == 143


def test_storage_failure_mid_run_stops_with_one_line(tmp_path, train_cmd):
  workdir = tmp_path / "run"
  proc = _start(train_cmd, workdir)
  try:
    while not checkpoint_steps(workdir):
      assert proc.poll() is None, proc.communicate()
      time.sleep(0.05)
    # The checkpoint directory becomes unusable: a file in its place.
    (workdir / "checkpoints").rename(tmp_path / "moved_away")
    (workdir / "checkpoints").write_text("not a directory")
    out, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 1, err[-3000:]
  assert "Traceback" not in err
  errors = error_lines(err)
  assert len(errors) == 1 and "checkpoint" in errors[0], err[-3000:]
  # It stopped within about one checkpoint interval (3 steps) of the failure.
  logged = [int(l.split()[1].split("/")[0]) for l in out.splitlines()
            if l.startswith("step ") and "/" in l.split()[1]]
  first = min(int(p.name) for p in (tmp_path / "moved_away").iterdir()
              if p.name.isdigit())
  assert max(logged) <= first + 2 * 3 + 3, (max(logged), first)
