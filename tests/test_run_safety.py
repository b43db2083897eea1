"""A run is never lost: resume checks, sound checkpoints, safe exits (issue 11).

In-process runs of `train.train_and_evaluate` on the tiny config, except
where the exit code or the absence of a traceback is the point.
"""
import json
import pathlib
import shlex
import shutil
import signal
import subprocess
import time

import chex
import jax
import numpy as np
import pytest

from byol_jax.trainer import checkpoint
from byol_jax.trainer import checksums
from byol_jax.interop import pretrained
from byol_jax import train
from byol_jax.trainer import lock as lock_lib
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
  (dst / lock_lib.LOCK_NAME).unlink(missing_ok=True)
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


def test_method_change_lists_every_field_and_its_fix_is_accepted(
    run_copy, tiny_config):
  from byol_jax.trainer import resume  # pylint: disable=g-import-not-at-top
  before = _tree(run_copy)
  config = _config(tiny_config, method="simsiam")
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config, str(run_copy))
  msg = str(e.value)
  saved = checkpoint.Checkpointer(str(run_copy), config,
                                  read_only=True).saved_config(6)
  refused, _ = resume.config_changes(saved, config)
  assert len(refused) > 6 and "method" in refused
  for key in refused:                    # Every field, method included.
    assert f" {key} " in f" {msg}" and f"--config.{key}=" in msg, key
  assert "\n" not in msg and _tree(run_copy) == before
  # The suggested overrides, applied as the command line would, resume.
  fixed = config.copy_and_resolve_references()
  for flag in msg.split(" resume this one with ")[1].split(" --"):
    key, _, value = flag.strip(" .-").removeprefix("config.").partition("=")
    *parents, leaf = key.split(".")
    node = fixed
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = (tuple(float(x) for x in value.strip("'()").split(","))
                  if isinstance(old, tuple) else
                  value == "True" if isinstance(old, bool) else
                  type(old)(value))
  assert resume.config_changes(saved, fixed) == ({}, {})


@pytest.mark.parametrize("entry,match", [
    ("model.num_filters", "shapes the train state"),
    ("model", "shapes the train state"),
    ("optimiser.base_lr", "no config field"),
])
def test_allow_changes_that_cannot_apply_is_one_line(run_copy, tiny_config,
                                                     entry, match):
  before = _tree(run_copy)
  config = _config(tiny_config, model__num_filters=8)
  with pytest.raises(ConfigError, match=match) as e:
    train.train_and_evaluate(config, str(run_copy), allow_changes=(entry,))
  assert "\n" not in str(e.value) and f"--allow_changes={entry}" in str(
      e.value)
  assert _tree(run_copy) == before


def test_load_run_opens_a_moved_checkpoint_where_it_lies(run_copy):
  _, kept, _ = pretrained.load_run(str(run_copy), 6)
  for folder in ("checkpoints_superseded", "checkpoints_damaged"):
    dst = run_copy / folder / "6-1700000000"
    dst.parent.mkdir()
    shutil.copytree(run_copy / "checkpoints" / "6", dst)
    for where in (dst, dst.parent):
      config, state, step = pretrained.load_run(str(where))
      assert step == 6 and config.method == "byol"
      chex.assert_trees_all_equal(state, kept)


def test_checkpoint_of_another_layout_is_refused_in_one_line(
    run_copy, tiny_config, monkeypatch):
  """A checkpoint whose state tree is not the one this version builds (as
  an older byol_jax's, whose BYOL heads had an output bias) is refused in
  one line naming a difference, before anything is compiled or moved."""
  from byol_jax.core import models  # pylint: disable=g-import-not-at-top
  from byol_jax.core.methods import byol  # pylint: disable=g-import-not-at-top
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
  assert "\n" not in msg and "another layout" in msg
  assert "leaves the checkpoint lacks:" in msg and "predictor" in msg, msg
  assert "dense2" in msg and "bias" in msg, msg
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
    run_copy, tiny_config, caplog):
  _damage(run_copy, 6, "truncate")
  _damage(run_copy, 4, "flip")
  config = _config(tiny_config, steps=6)
  final = train.train_and_evaluate(config, str(run_copy))
  assert final["step"] == 6
  # Each said in one short line: the code and the file, no TensorStore spec.
  damage = [r.getMessage() for r in caplog.records
            if "is damaged" in r.getMessage()]
  assert len(damage) == 2 and "OUT_OF_RANGE: file" in damage[0], damage
  assert not any("tensorstore_spec" in m or "\n" in m for m in damage)
  moved = sorted(p.name.split("-")[0]
                 for p in (run_copy / "checkpoints_damaged").iterdir())
  assert moved == ["4", "6"]
  assert checkpoint_steps(run_copy) == [2, 4, 6]  # Trained again from 2.


def _state_at(workdir, step):
  _, state, _ = pretrained.load_run(str(workdir), step)
  return state, step


def test_checksums_see_one_ulp_and_swaps_but_not_the_layout():
  from byol_jax.core import sharding  # pylint: disable=g-import-not-at-top
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
  from byol_jax.core import methods, optim, sharding, train_state  # pylint: disable=g-import-not-at-top
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
                                                        tiny_config, capsys):
  for step, how in ((2, "delete"), (4, "truncate"), (6, "flip")):
    _damage(run_copy, step, how)
  # The first run quarantines them and stops; the same command again (as
  # any auto-restart does) stops the same way: nothing trains.
  for _ in range(2):
    with pytest.raises(ConfigError, match="does not start again from step 0"
                       ) as e:
      train.train_and_evaluate(_config(tiny_config), str(run_copy))
    msg = str(e.value)
    assert "\n" not in msg and "steps [2, 4, 6]" in msg
    assert "--start_over" in msg
    assert checkpoint_steps(run_copy) == []
    assert len(list((run_copy / "checkpoints_damaged").iterdir())) == 3
    assert "Starting from step 0" not in capsys.readouterr().out
  # Asked for: it starts over, the damaged checkpoints stay where they are.
  config = _config(tiny_config, steps=2)
  assert train.train_and_evaluate(config, str(run_copy),
                                  start_over=True)["step"] == 2
  assert checkpoint_steps(run_copy) == [2]
  assert len(list((run_copy / "checkpoints_damaged").iterdir())) == 3


@pytest.mark.parametrize("change", ["reshaped", "extra"])
def test_another_layout_is_one_line_and_moves_nothing(tmp_path, tiny_config,
                                                      change):
  """A checkpoint whose leaves differ from the state this code builds (a
  library change that reshapes or adds a leaf) is refused, not damage."""
  from byol_jax.core import methods, optim, sharding, train_state  # pylint: disable=g-import-not-at-top
  config = _config(tiny_config)
  mesh = sharding.make_mesh()
  model = methods.get(config.method).make_network(config)
  tx, _ = optim.build_optimizer(config, 6, 1)
  state = jax.device_get(train_state.create(config, model, tx, mesh, True))
  params = jax.tree.map(lambda x: x, state.params)       # A mutable copy.
  if change == "reshaped":
    kernel = params["encoder"]["stem_conv"]["kernel"]     # [3, 3, 3, 4]
    params["encoder"]["stem_conv"]["kernel"] = np.concatenate(
        [kernel, kernel[..., :1]], axis=-1)
    expected = "params.encoder.stem_conv.kernel (3, 3, 3, 5) -> (3, 3, 3, 4)"
  else:
    params["extra"] = {"scale": np.ones((7,), np.float32)}
    expected = "does not build: params.extra.scale"
  workdir = tmp_path / "run"
  with checkpoint.Checkpointer(str(workdir), config) as ckpt:
    ckpt.save(2, state)
    ckpt.save(4, state.replace(params=params))
  before = _tree(workdir)
  with pytest.raises(ConfigError, match="another layout") as e:
    train.train_and_evaluate(config, str(workdir))
  msg = str(e.value)
  assert "\n" not in msg and expected in msg and "nothing was moved" in msg
  assert "tensorstore" not in msg.lower()
  assert _tree(workdir) == before


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
def test_non_finite_state_is_never_saved_and_the_advice_runs(tmp_path,
                                                             train_cmd):
  """LR 1e5: the state goes NaN within a few steps. No NaN is saved; the
  error names a checkpoint that is not diverging (or says to start over)
  and a lower learning rate, in a command that finishes as printed."""
  workdir = tmp_path / "nan"
  cmd = train_cmd(workdir, "steps=30", "--config.optimizer.base_lr=1e5",
                  "--config.warmup_epochs=0.0", "--config.log_every_steps=5",
                  "--config.checkpoint_every_steps=3",
                  "--config.keep_checkpoints=30", "--config.knn.enabled=False")
  proc = subprocess.run(cmd, cwd=REPO, env=train_env(2), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  saved = checkpoint_steps(workdir)
  assert saved, "the state was finite for a few steps at least"
  _all_finite(workdir)
  _no_tmp(workdir)
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
  msg = errors[0]
  assert "NaN or infinite" in msg and "LOWER" not in msg
  # With LR 1e5 the weights grow ~100x a step: every finite checkpoint is
  # already diverging, so the advice is to start over, at the method's
  # published rate (0.2) rather than 1e4.
  assert "grew past 10x" in msg and "--start_over" in msg, msg
  assert "--config.optimizer.base_lr=0.2" in msg
  printed = shlex.split(msg.split("The command: ", 1)[1])
  again = subprocess.run(printed, cwd=REPO, env=train_env(2),
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Starting over on purpose" in again.stdout
  final = [l for l in again.stdout.splitlines() if l.startswith("done:")]
  assert final and np.isfinite(float(final[0].split("final loss ")[1]
                                     .split(",")[0]))
  assert checkpoint_steps(workdir)[-1] == 30
  _all_finite(workdir)
  # The diverged checkpoints are kept, out of the way.
  moved = sorted(int(p.name.split("-")[0])
                 for p in (workdir / "checkpoints_superseded").iterdir())
  assert moved == saved


def test_nan_advice_names_the_newest_healthy_checkpoint(tmp_path,
                                                         tiny_config):
  from byol_jax.trainer import divergence  # pylint: disable=g-import-not-at-top
  rows = [dict(step=0, param_norm=20.0), dict(step=5, param_norm=25.0,
                                             loss=3.0),
          dict(step=6, param_norm=31.0), dict(step=9, param_norm=900.0),
          dict(step=10, param_norm=4e30, loss=9.0)]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "par')
  health = divergence.Health(checkpoint.as_path(tmp_path))
  config = _config(tiny_config, optimizer__base_lr=1.0)
  flags, why = divergence.resume_flags(config, health, [3, 6, 9])
  # 3: no norm known; 6: 1.55x the initial norm; 9: 45x, 29x in 3 steps.
  assert flags == ["--restore_step=6", "--config.optimizer.base_lr=0.1",
                   "--allow_changes=optimizer.base_lr"]
  assert "newer ones [9]" in why
  # A long run whose norm drifted 15x in small steps is not diverging.
  health.norms = {0: 20.0, **{100 * i: 20.0 * 1.2 ** i for i in range(1, 16)}}
  assert health.healthy(1500) and not health.healthy(7)
  health.norms[1600] = 20.0 * 1.2 ** 15 * 3                  # A jump.
  assert not health.healthy(1600)
  config.optimizer.base_lr = 50.0       # Never above the paper's rate.
  assert divergence.lower_lr(config) == 0.2
  argv = ["/x/train.py", "--config=c.py:steps=9", "--restore_step", "3",
          "--config.optimizer.base_lr=50", "--allow_changes=total_steps",
          "--workdir=/w"]
  cmd = shlex.split(divergence.command(argv, flags))
  assert cmd[1:] == ["-m", "byol_jax.train", "--config=c.py:steps=9",
                     "--workdir=/w", "--restore_step=6",
                     "--config.optimizer.base_lr=0.1",
                     "--allow_changes=total_steps,optimizer.base_lr"]


# The lock's liveness rules: tests/test_pod.py.


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
    ("eval_batch_size", -8, "eval_batch_size=-8 must be >= 0"),
    ("data__eval_split", "nope", "nope"),
    ("data__train_split", "nope", "nope"),
    ("method", "moco", "Unknown method"),
    ("batch_size", 12, "not divisible by the 8 devices"),
    ("batch_size", 0, "batch_size=0: a batch needs at least one image"),
    ("batch_size", -64, "batch_size=-64: a batch needs at least one image"),
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
  assert not (workdir / lock_lib.LOCK_NAME).exists()
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
    # Paused (a stopped process still holds its lock) so that the second
    # trainer's start-up has the CPUs; then it must train on.
    first.send_signal(signal.SIGSTOP)
    second = subprocess.run(
        train_cmd(workdir, "steps=10", "--config.seed=7"), cwd=REPO,
        env=train_env(2), capture_output=True, text=True, timeout=300)
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    errors = error_lines(second.stderr)
    assert len(errors) == 1 and f"pid {first.pid}" in errors[0], second.stderr
    _wait_for_step(first, 1)  # The first one trains on.
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


def test_full_disk_stops_with_one_line_and_keeps_everything(small_disk,
                                                            train_cmd):
  """An 8 MiB workdir that fills up mid-run: one error line, exit 1, every
  metrics line written before intact, 'checkpoint ->' said only for the
  saves that committed, and the last of them restores."""
  disk, fill = small_disk
  workdir = disk / "run"
  fill(free_kib=1400)                     # About two checkpoints' worth.
  cmd = train_cmd(workdir, "steps=10", "--config.log_every_steps=1",
                  "--config.checkpoint_every_steps=2",
                  "--config.keep_checkpoints=10", "--config.knn.enabled=False")
  proc = subprocess.run(cmd, cwd=REPO, env=train_env(2), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and ("No space left" in errors[0] or
                                "RESOURCE_EXHAUSTED" in errors[0]), errors
  assert "tensorstore_spec" not in errors[0]
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
          .splitlines()]
  logged = [int(l.split()[1].split("/")[0]) for l in proc.stdout.splitlines()
            if l.startswith("step ") and "/" in l.split()[1]]
  assert logged and [r["step"] for r in rows if "loss" in r] == logged
  said = [int(l.split()[1].rstrip(":")) for l in proc.stdout.splitlines()
          if "checkpoint ->" in l]
  assert said and said == checkpoint_steps(workdir), proc.stdout
  assert said[-1] < 10
  _, state, step = pretrained.load_run(str(workdir))   # It restores.
  assert step == said[-1] and int(state["step"]) == step
  _all_finite(workdir)
