"""`python -m byol_jax.train` end to end: checkpoints, resume, preemption, errors."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from byol_jax import checkpoint
from byol_jax import methods
from byol_jax import optim
from byol_jax import sharding
from byol_jax import train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
# Small enough for a 2-core CI machine: 4 base filters, 32 px, batch 16.
TINY = ["--config.model.num_filters=4", "--config.projector.hidden_dim=32",
        "--config.predictor.hidden_dim=32", "--config.knn.k=10"]


def _env(devices=8):
  # XLA:CPU aborts a collective when one simulated device has not reached it
  # within 40 s; with 8 devices on 2 loaded cores we saw that in runs of
  # hundreds of steps, so the longer runs use 2 devices (the short runs and
  # tests/test_step.py cover 8).
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _train_cmd(workdir, cifar_npz, arg="", *extra, narrow=True):
  """The CLI on configs/tiny.py; `narrow`: batch 16 and the TINY overrides."""
  arg = ",".join(a for a in ("batch=16" if narrow else "", arg) if a)
  return [sys.executable, "-m", "byol_jax.train",
          f"--config={REPO / 'configs' / 'tiny.py'}:path={cifar_npz}"
          + (f",{arg}" if arg else ""),
          f"--workdir={workdir}", *(TINY if narrow else ()), *extra]


def run_train(workdir, cifar_npz, arg="", *extra, check=True, timeout=600,
              devices=8, narrow=True):
  proc = subprocess.run(
      _train_cmd(workdir, cifar_npz, arg, *extra, narrow=narrow), cwd=REPO,
      env=_env(devices), capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout}\n"
                         f"{proc.stderr[-5000:]}")
  return proc


def steps_on_disk(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def final_params(workdir):
  _, state, step = checkpoint.load_run(str(workdir))
  return state, step


# ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["byol", "simsiam", "simclr"])
def test_end_to_end_then_continue(tmp_path, cifar_npz, method):
  workdir = tmp_path / "run"
  proc = run_train(workdir, cifar_npz, f"steps=8,method={method}",
                   "--config.checkpoint_every_steps=4")
  assert "step 8/8" in proc.stdout
  assert "eval/online_top1" in proc.stdout and "eval/knn_top1" in proc.stdout
  assert steps_on_disk(workdir) == [4, 8]
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard events"
  assert (workdir / "config.json").exists()
  assert (workdir / "metrics.jsonl").read_text().count('"loss"') >= 1
  # Running again with more steps continues from step 8.
  proc = run_train(workdir, cifar_npz, f"steps=12,method={method}",
                   "--config.checkpoint_every_steps=4")
  assert "step 12/12" in proc.stdout and "step 10/12" in proc.stdout
  assert "Resuming from step 8" in proc.stderr, proc.stderr[-3000:]
  assert steps_on_disk(workdir)[-1] == 12
  check_load_encoder(workdir, method)


def check_load_encoder(workdir, method):
  """load_encoder gives the features the trainer's own network computes."""
  import byol_jax  # pylint: disable=g-import-not-at-top
  config, state, step = checkpoint.load_run(str(workdir))
  assert step == 12 and config.method == method
  model = methods.get(method).make_network(config)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
  expected = model.apply({"params": state["params"],
                          "batch_stats": state["batch_stats"]}, x,
                         train=False, method=model.represent)
  encoder, variables = byol_jax.load_encoder(str(workdir))
  assert set(variables) == {"params", "batch_stats"}
  features = encoder.apply(variables, x, train=False)
  assert features.shape == (4, 4 * 8)  # num_filters 4, x8 at the last stage
  np.testing.assert_array_equal(np.asarray(features), np.asarray(expected))


@pytest.mark.parametrize("method", ["byol", "simsiam", "simclr"])
def test_kill_and_resume_matches_uninterrupted(tmp_path, cifar_npz, method):
  n2 = 40
  arg = f"steps={n2},method={method}"
  ref = tmp_path / "ref"
  run_train(ref, cifar_npz, arg, "--config.checkpoint_every_steps=10",
            devices=2)
  # Same run, killed with SIGKILL once a checkpoint is on disk, then resumed.
  killed = tmp_path / "killed"
  proc = subprocess.Popen(
      _train_cmd(killed, cifar_npz, arg,
                 "--config.checkpoint_every_steps=10"),
      cwd=REPO, env=_env(2), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not steps_on_disk(killed) and time.time() < deadline:
    if proc.poll() is not None:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = steps_on_disk(killed)
  assert saved and saved[-1] < n2, f"kill came too late: {saved}"
  run_train(killed, cifar_npz, arg,
            "--config.checkpoint_every_steps=10", devices=2)
  (a, sa), (b, sb) = final_params(ref), final_params(killed)
  assert sa == sb == n2
  chex.assert_trees_all_close(a["params"], b["params"], rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(a["target"], b["target"], rtol=1e-6, atol=1e-7)


def test_sigterm_saves_the_step_reached(tmp_path, cifar_npz):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      _train_cmd(workdir, cifar_npz, "steps=100000",
                 "--config.checkpoint_every_steps=100000",
                 "--config.log_every_steps=1"),
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  # Wait until it trains (a progress line), then preempt it.
  seen = 0
  for line in proc.stdout:
    if line.startswith("step "):
      seen += 1
      if seen == 3:
        break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  logged = [int(l.split()[1].split("/")[0]) for l in out.splitlines()
            if l.startswith("step ") and "/" in l.split()[1]]
  saved = steps_on_disk(workdir)
  assert len(saved) == 1 and saved[0] >= 3
  assert saved[0] >= max(logged, default=0)
  assert f"Saved step {saved[0]} after SIGTERM" in err


def test_damaged_newest_checkpoint_falls_back(tmp_path, cifar_npz):
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  import test_step  # pylint: disable=g-import-not-at-top
  config = test_step.tiny_config(cifar_npz)
  mesh = sharding.make_mesh()
  method = methods.get(config.method)
  model = method.make_network(config)
  tx, _ = optim.build_optimizer(config, 10, 10)
  state = train_state.create(config, model, tx, mesh, True)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  ckpt.save(1, state)
  ckpt.save(2, state.replace(step=state.step + 1))
  ckpt.wait()
  # Damage the newest: truncate every file of its state.
  for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  restored = ckpt.restore(train_state.abstract(config, model, tx, mesh, True))
  assert int(restored.step) == 0  # step 1 held the initial state
  leaf = jax.tree.leaves(restored.params)[0]
  assert isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated
  assert len(leaf.sharding.device_set) == len(jax.devices())
  assert steps_on_disk(tmp_path) == [1]
  assert list((tmp_path / "checkpoints_damaged").iterdir())
  chex.assert_trees_all_close(jax.device_get(restored.params),
                              jax.device_get(state.params))
  ckpt.close()
  del config_lib


@pytest.mark.parametrize("overrides,expected", [
    (["--config.data.source=tfds", "--config.data.name=no_such_dataset"],
     "no_such_dataset"),
    (["--config.batch_size=12"], "not divisible"),
    (["--config.data.source=folder", "--config.data.path=/no/such/folder"],
     "/no/such/folder"),
    (["--config.method=moco"], "Unknown method"),
])
def test_bad_config_exits_with_one_clear_line(tmp_path, cifar_npz, overrides,
                                              expected):
  proc = run_train(tmp_path / "run", cifar_npz, "steps=2", *overrides,
                   check=False, timeout=300)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]


# ------------------------------------------ learning, linear evaluation -----
# Pretraining long enough for a linear probe to see what was learned: the
# tiny config (8 base filters, batch 64, its mild augmentations), 300 steps
# (about 4 passes over the 5,000 training images), on 2 devices (see _env).
# SimSiam learns more slowly: its features first get worse than the random
# encoder's and pass it after about 700 steps (measured with a logistic probe:
# 26% at 250 steps, 28% at 500, 30% at 750, 32% at 1000, random 28%).
LEARN_STEPS = {"byol": 300, "simclr": 300, "simsiam": 1000}


def _learned_and_random(tmp_path, cifar_npz, method):
  """Pretrains with the CLI; returns (trained dir, random dir, logs, config).

  The random workdir holds a checkpoint of the same network at the
  initialisation the trainer started from (same config and seed).
  """
  trained = tmp_path / "trained"
  steps = LEARN_STEPS[method]
  run_train(trained, cifar_npz, f"method={method},steps={steps}",
            "--config.checkpoint_every_steps=1000",
            "--config.log_every_steps=10", timeout=1500, devices=2,
            narrow=False)
  logs = [json.loads(line) for line in
          (trained / "metrics.jsonl").read_text().splitlines()]
  logs = [r for r in logs if "loss" in r]

  config, _, step = checkpoint.load_run(str(trained))
  assert step == steps
  method_lib = methods.get(method)
  model = method_lib.make_network(config)
  tx, _ = optim.build_optimizer(config, steps, 1)
  init = train_state.create(config, model, tx, sharding.make_mesh(),
                            method_lib.HAS_TARGET)
  random = tmp_path / "random"
  ckpt = checkpoint.Checkpointer(str(random), config)
  ckpt.save(0, init)
  ckpt.close()
  return trained, random, logs, config


@pytest.mark.parametrize("method", ["byol", "simsiam", "simclr"])
def test_pretraining_beats_a_random_encoder_in_linear_eval(tmp_path, cifar_npz,
                                                           method):
  """Pretrain, then the linear-eval CLI path on it and on its init."""
  from byol_jax import linear_eval as cli  # pylint: disable=g-import-not-at-top
  trained, random, logs, config = _learned_and_random(tmp_path, cifar_npz,
                                                      method)
  # It learned without collapsing (the std of the normalised projections is
  # about 1/sqrt(dim) when they spread over the sphere, 0 when collapsed).
  loss = np.array([r["loss"] for r in logs])
  std = np.array([r["embedding_std"] for r in logs])
  assert np.isfinite(loss).all()
  assert loss[-3:].mean() < loss[:3].mean() - 0.2, loss
  dim = config.projector.output_dim
  assert std[-3:].mean() > 0.25 / np.sqrt(dim), std

  # The same evaluation (10 epochs of the protocol, test split) of both.
  def top1(workdir):
    result = cli.run(str(workdir), epochs=10, batch_size=64,
                     eval_batch_size=200)
    assert result["num_eval_examples"] == 1000
    return result["top1"]

  learned, baseline = top1(trained), top1(random)
  print(f"{method}: linear top-1 {learned:.3f} after {LEARN_STEPS[method]} "
        f"steps vs {baseline:.3f} at initialisation")
  assert 0.15 < baseline
  assert learned > baseline + 0.015, (learned, baseline)
  assert json.loads((trained / "linear_eval.json").read_text())["top1"] == (
      learned)
