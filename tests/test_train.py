"""`python -m byol_jax.train` end to end: console, files, resume, errors."""
import json
import signal
import subprocess
import sys
import time
import types

import chex
import jax
import numpy as np
import pytest

import byol_jax
from byol_jax import progress
from byol_jax.core import methods
from byol_jax.interop import pretrained
from testlib import REPO, TRAINED_STEPS, assert_error_first, checkpoint_steps
from testlib import error_lines
from testlib import noisy_lines, train_env


def _progress_steps(stdout: str) -> list[int]:
  return [int(l.split()[1].split("/")[0]) for l in stdout.splitlines()
          if l.startswith("step ") and "/" in l.split()[1]]


def test_a_run_writes_what_it_promises(trained_run):
  workdir, proc = trained_run
  out, err = proc.stdout, proc.stderr
  assert _progress_steps(out) == [4, 8, 12, 16]
  assert "Starting from step 0." in out
  assert "eval: " in out and "knn_top1" in out and "online_top1" in out
  assert out.strip().splitlines()[-1].startswith("done: steps 0-16")
  assert checkpoint_steps(workdir) == [8, 16]
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["num_classes"] == 10 and config["method"] == "byol"
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
          .splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12, 16]
  assert any("eval/knn_top1" in r for r in rows)
  # Global L2 norms at every logged step; elapsed time and ETA.
  logged = [r for r in rows if "loss" in r]
  for r in logged:
    assert all(0 < r[k] < 1e4 for k in ("grad_norm", "update_norm",
                                         "param_norm")), r
  elapsed = [r["elapsed_seconds"] for r in logged]
  assert elapsed == sorted(elapsed) and elapsed[0] > 0
  assert logged[-1]["eta_seconds"] == 0 < logged[0]["eta_seconds"]
  lines = [l for l in out.splitlines()
           if l.startswith("step ") and "/" in l.split()[1]]
  assert len(lines) == 4 and all(" elapsed " in l and " eta " in l
                                 for l in lines), lines
  assert f"Profiled steps 2-3: {workdir}/plugins/profile\n" in out
  # A readable console: the trainer's own lines only, no library INFO logs,
  # no TensorFlow start-up notices.
  lines = (out + err).strip().splitlines()
  assert len(lines) <= 30, "\n".join(lines)
  assert not noisy_lines(out + err), noisy_lines(out + err)


def test_tensorboard_reads_the_event_files(trained_run):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  workdir, _ = trained_run
  acc = event_accumulator.EventAccumulator(str(workdir))
  acc.Reload()
  assert {"loss", "lr", "eval/knn_top1", "grad_norm", "update_norm",
          "param_norm", "elapsed_seconds"} <= set(acc.Tags()["scalars"])
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
          .splitlines() if '"loss"' in l]
  assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("loss")] == [
      (r["step"], r["loss"]) for r in rows]


def test_the_profile_plugin_lists_the_trace(trained_run):
  """--profile_steps=2:4 left a trace where TensorBoard's profile plugin
  (its own code) finds a run with the trace viewer."""
  from xprof import profile_plugin  # pylint: disable=g-import-not-at-top
  from xprof.standalone.tensorboard_shim import base_plugin  # pylint: disable=g-import-not-at-top
  workdir, _ = trained_run
  traces = list(workdir.glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
  plugin = profile_plugin.ProfilePlugin(base_plugin.TBContext(
      logdir=str(workdir),
      flags=types.SimpleNamespace(master_tpu_unsecure_channel="")))
  assert plugin.runs_imp() == [traces[0].parent.name]
  # The tools it offers for the run come from reading the trace.
  assert "trace_viewer@" in plugin.generate_tools_of_run(
      traces[0].parent.name, str(traces[0].parent))


def test_continue_a_run_and_load_its_encoders(trained_copy, run_train):
  before = [json.loads(l) for l in (trained_copy / "metrics.jsonl")
            .read_text().splitlines()]
  start = time.monotonic()
  proc = run_train(trained_copy, f"steps={TRAINED_STEPS + 4}",
                   "--config.checkpoint_every_steps=4",
                   "--config.log_every_steps=2", "--config.knn.enabled=False")
  wall = time.monotonic() - start
  assert "Resuming from step 16." in proc.stdout
  assert proc.stdout.count("Resuming with changed settings") == 1
  assert _progress_steps(proc.stdout) == [18, 20]
  assert checkpoint_steps(trained_copy) == [8, 16, 20]
  # The elapsed time goes on from the first run's; the ETA counts this
  # run's steps per second (images/s x ETA = the images left).
  was = [r["elapsed_seconds"] for r in before if "elapsed_seconds" in r][-1]
  rows = [json.loads(l) for l in (trained_copy / "metrics.jsonl").read_text()
          .splitlines()[len(before):] if '"loss"' in l]
  assert [r["step"] for r in rows] == [18, 20]
  assert was < rows[0]["elapsed_seconds"] < rows[1]["elapsed_seconds"]
  assert rows[1]["elapsed_seconds"] - was < wall
  batch = json.loads((trained_copy / "config.json").read_text())["batch_size"]
  assert rows[0]["eta_seconds"] * rows[0]["images_per_sec"] == pytest.approx(
      2 * batch)
  assert " in all" in proc.stdout.strip().splitlines()[-1]

  # load_encoder gives the features the trainer's own network computes, for
  # the online and the target (EMA) encoder.
  config, state, step = pretrained.load_run(str(trained_copy))
  assert step == 20 and config.method == "byol"
  model = methods.get("byol").make_network(config)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
  for which, tree in (("online", state), ("target", state["target"])):
    expected = model.apply({"params": tree["params"],
                            "batch_stats": tree["batch_stats"]}, x,
                           train=False, method=model.represent)
    encoder, variables = byol_jax.load_encoder(str(trained_copy),
                                               which=which)
    assert set(variables) == {"params", "batch_stats"}
    features = encoder.apply(variables, x, train=False)
    assert features.shape == (4, 4 * 8)  # 4 filters, x8 at the last stage
    np.testing.assert_array_equal(np.asarray(features), np.asarray(expected))
  online = byol_jax.load_encoder(str(trained_copy))[1]
  target = byol_jax.load_encoder(str(trained_copy), which="target")[1]
  assert not np.array_equal(online["params"]["stem_conv"]["kernel"],
                            target["params"]["stem_conv"]["kernel"])


def test_elapsed_time_and_eta_across_restarts(monkeypatch):
  """A start at step 10 of a run that had run 500 s: the elapsed time goes
  on from 500 s; images/s and the ETA count from the end of its first step
  (60 s of compiling)."""
  clock = [1000.0]
  monkeypatch.setattr(progress, "time",
                      types.SimpleNamespace(monotonic=lambda: clock[0]))
  meter = progress.Progress(10, 30, batch_size=8, elapsed_before=500.0)
  clock[0] += 60
  meter.first_step_done(11)
  m = dict(loss=1.0, lr=0.1, embedding_std=0.1)
  assert meter.times(11) == dict(images_per_sec=0.0, elapsed_seconds=560.0)
  assert meter.line(11, dict(m, **meter.times(11))).endswith(
      "img/s - elapsed 9m20s eta -")
  clock[0] += 10  # 2 steps in 10 s: 0.2 steps/s, 17 steps left.
  assert meter.times(13) == dict(images_per_sec=pytest.approx(1.6),
                                 elapsed_seconds=570.0,
                                 eta_seconds=pytest.approx(85.0))
  assert meter.line(13, dict(m, **meter.times(13))).endswith(
      "img/s 1.6 elapsed 9m30s eta 1m25s")
  assert meter.summary(13, {}) == (
      "done: steps 10-13 in 1m10s (compiling 1m00s), 9m30s in all")


# Killed (SIGKILL, as pid 1 of a container) and resumed, bit for bit the
# uninterrupted run: tests/test_pod.py::test_container_restart_resumes_as_pid_1.
# (the empty-manifest checkpoint it meets is quarantined there too).


def _kill_after_first_checkpoint(cmd, workdir, timeout_s=300) -> list[int]:
  """Starts the trainer, kills it (SIGKILL) once a checkpoint is on disk."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(2),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout_s
  while not checkpoint_steps(workdir) and time.time() < deadline:
    if proc.poll() is not None:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return checkpoint_steps(workdir)


@pytest.mark.slow  # Three trainer runs (about 85 s on a loaded 2-core box).
def test_undecodable_images_kill_and_resume_matches(tmp_path, nette_folder,
                                                    run_train, train_cmd):
  """JPEGs that pass the start-up scan but fail to decode: a run killed
  after its first checkpoint and resumed equals the uninterrupted one, and
  the replaced images are counted on the console."""
  root = tmp_path / "images"
  for i, p in enumerate(sorted((nette_folder / "val").rglob("*.JPEG"))[:36]):
    dst = root / "train" / p.parent.name / p.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    b = bytearray(p.read_bytes())
    if i % 9 == 4:  # 4 of 36: real header and end marker, garbage inside.
      b[600:-2] = np.random.default_rng(i).bytes(len(b) - 602)
    dst.write_bytes(bytes(b))
  arg = f"steps={TRAINED_STEPS},source=folder,path={root}"
  flags = ["--config.checkpoint_every_steps=8", "--config.log_every_steps=4",
           "--config.data.on_device=False", "--config.data.num_classes=-1",
           "--config.knn.enabled=False", "--config.data.eval_split=",
           "--config.data.max_undecodable_fraction=0.2"]
  ref = run_train(tmp_path / "ref", arg, *flags, devices=2)
  steps = [l for l in ref.stdout.splitlines()
           if l.startswith("step ") and "/" in l.split()[1]]
  counts = [int(l.split("undecodable ")[1].split()[0]) for l in steps
            if "undecodable" in l]
  # 16 x 16 images read, 1 in 9 of them bad: about 28 replaced.
  assert counts and 10 <= counts[-1] <= 50, ref.stdout
  assert f"{counts[-1]} undecodable images replaced" in ref.stdout
  killed = tmp_path / "killed"
  saved = _kill_after_first_checkpoint(train_cmd(killed, arg, *flags), killed)
  assert saved and saved[-1] < TRAINED_STEPS, f"kill came too late: {saved}"
  run_train(killed, arg, *flags, devices=2)
  (_, a, sa), (_, b, sb) = (pretrained.load_run(str(tmp_path / "ref")),
                            pretrained.load_run(str(killed)))
  assert sa == sb == TRAINED_STEPS
  chex.assert_trees_all_equal(a, b)  # Leaf for leaf, bit for bit.
  # Past the threshold: one line, at the first log step.
  strict = run_train(tmp_path / "strict", arg, *flags[:-1], check=False,
                     devices=2)
  errors = error_lines(strict.stderr)
  assert strict.returncode == 1 and len(errors) == 1, strict.stderr[-3000:]
  assert "failed to decode" in errors[0]
  assert "max_undecodable_fraction=0.01" in errors[0]
  assert "Traceback" not in strict.stderr


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/no_such_config.py"], "no_such_config.py"),
    (["--config=configs/tiny.py:stepz=3"], "Unknown config argument 'stepz'"),
    (["--config=configs/tiny.py", "--config.optimizer.base_lrr=1"],
     "unknown config field 'base_lrr' in a --config.FIELD=VALUE override: "
     "did you mean 'base_lr'?"),
    (["--config=configs/tiny.py", "--config.batch_size=abc"],
     "--config.batch_size=abc"),
    (["--config=configs/tiny.py", "--config.total_steps=-5"],
     "total_steps=-5"),
    (["--config=configs/tiny.py", "--config.data.source=folder",
      "--config.data.path=/no/such/folder"], "/no/such/folder"),
])
def test_bad_command_line_gives_one_error_line(tmp_path, cifar_npz, args,
                                               expected):
  args = [a.replace("configs/tiny.py", f"configs/tiny.py:path={cifar_npz}")
          if a == "--config=configs/tiny.py" else a for a in args]
  proc = subprocess.run(
      [sys.executable, "-m", "byol_jax.train", *args,
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=train_env(8),
      capture_output=True, text=True, timeout=300)
  assert expected in assert_error_first(proc), proc.stderr[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_kill_and_resume_on_a_tfds_source(tmp_path, cifar_npz, train_cmd,
                                          run_train):
  """A TFDS source of 5 files, whose order changes every epoch: a run killed
  after its first checkpoint and resumed ends bit for bit where the
  uninterrupted run does."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import importlib.resources  # pylint: disable=g-import-not-at-top
  sys.modules.setdefault("importlib_resources", importlib.resources)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  d = np.load(cifar_npz)

  def examples(split, n):
    off, blob = d[f"{split}_offsets"], d[f"{split}_jpeg"]
    return [(str(i), dict(image=np.asarray(Image.open(io.BytesIO(
        blob[off[i]:off[i + 1]].tobytes())).convert("RGB")),
                          label=int(d[f"{split}_labels"][i])))
            for i in range(n)]
  data_dir = tmp_path / "tfds"
  tfds.dataset_builders.store_as_tfds_dataset(
      name="tiny_cifar", version="1.0.0",
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(num_classes=10)}),
      split_datasets=dict(train=examples("train", 64),
                          test=examples("test", 16)),
      data_dir=str(data_dir),
      download_config=tfds.download.DownloadConfig(num_shards=5))
  steps = 12  # 3 epochs of 4 batches of 16.
  arg = f"steps={steps},source=tfds"
  flags = ["--config.data.name=tiny_cifar", f"--config.data.data_dir={data_dir}",
           "--config.data.on_device=False", "--config.data.shuffle_buffer=8",
           "--config.checkpoint_every_steps=6", "--config.log_every_steps=6",
           "--config.knn.enabled=False"]
  ref = tmp_path / "ref"
  run_train(ref, arg, *flags, devices=2)
  killed = tmp_path / "killed"
  saved = _kill_after_first_checkpoint(train_cmd(killed, arg, *flags), killed,
                                       timeout_s=600)
  assert saved and saved[-1] < steps, f"kill came too late: {saved}"
  run_train(killed, arg, *flags, devices=2)
  (_, a, sa), (_, b, sb) = (pretrained.load_run(str(ref)),
                            pretrained.load_run(str(killed)))
  assert sa == sb == steps
  chex.assert_trees_all_equal(a, b)  # Bit for bit.
