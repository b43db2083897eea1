"""A pod's first day, rehearsed here (issue 22): a gs:// workdir on a local
GCS emulator, SIGTERM during compilation and mid-run, a container restart
(pid 1 of a new PID namespace) and the workdir lock's liveness rules.

The uninterrupted reference is the session's `trained_run` (local disk, 16
steps, checkpoints every 8, logs every 4, 2 devices).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import chex
import numpy as np
import pytest
from etils import epath

import byol_jax
from byol_jax.trainer import lock as lock_lib
from byol_jax.interop import pretrained
from byol_jax.errors import ConfigError
from testlib import REPO, TRAINED_STEPS, checkpoint_steps, train_env

FLAGS = ["--config.checkpoint_every_steps=8", "--config.log_every_steps=4"]


def _start(cmd, env=None, preexec=None):
  return subprocess.Popen(cmd, cwd=REPO, env=env or train_env(2),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, preexec_fn=preexec)


def _until(proc, text: str) -> list[str]:
  """Reads the trainer's stdout until a line containing `text`."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"no {text!r}: {''.join(lines)}{proc.stderr.read()}")


def _names(path: epath.Path) -> list[str]:
  return sorted(p.name for p in path.iterdir()) if path.exists() else []


def _no_tmp_on(workdir: epath.Path) -> None:
  ckpts = workdir / "checkpoints"
  leftovers = [n for n in _names(ckpts) if "tmp" in n]
  for step in (n for n in _names(ckpts) if n.isdigit()):
    leftovers += [n for n in _names(ckpts / step) if "tmp" in n]
  assert not leftovers, leftovers


# ----------------------------------------------------------- gs:// workdir ----
def test_gcs_run_survives_sigterm_anywhere_and_is_read_back(
    gcs_bucket, trained_run, train_cmd, run_train, tmp_path):
  ref, _ = trained_run
  url = f"{gcs_bucket}/run-{uuid.uuid4().hex[:6]}"
  workdir = epath.Path(url)
  cmd = train_cmd(url, f"steps={TRAINED_STEPS}", *FLAGS)

  # 1. SIGTERM while the first step compiles (no compilation cache, so that
  # it takes seconds): gone within 10 s, nothing half-written.
  proc = _start(cmd, env=dict(train_env(2),
                              JAX_ENABLE_COMPILATION_CACHE="false"))
  _until(proc, "Compiling the train step")
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  took = time.monotonic() - sent
  assert proc.returncode == 143, err[-3000:]
  assert took < 10, f"{took:.1f}s"
  assert "Preempted while compiling the train step" in out, out
  assert "Traceback" not in err, err[-3000:]
  assert not (workdir / lock_lib.LOCK_NAME).exists()
  _no_tmp_on(workdir)

  # 2. SIGTERM mid-run: it saves the step it reached and stops. Sent at the
  # first progress line (step 4), well before the end: a loaded machine's
  # test process reads the trainer's lines late, and a signal sent at step 8
  # was once seen only after step 16, in the final evaluation.
  proc = _start(cmd)
  _until(proc, f"step 4/{TRAINED_STEPS}")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert "Preempted: saved step " in out, out[-3000:]
  preempted = int(out.split("Preempted: saved step ")[1].split(";")[0])
  assert 4 <= preempted < TRAINED_STEPS, out
  assert not (workdir / lock_lib.LOCK_NAME).exists()
  _no_tmp_on(workdir)

  # 3. The same command resumes and finishes: bit for bit the local run.
  proc = run_train(url, f"steps={TRAINED_STEPS}", *FLAGS, devices=2)
  assert f"Resuming from step {preempted}." in proc.stdout
  (_, a, sa), (_, b, sb) = (pretrained.load_run(str(ref)),
                            pretrained.load_run(url))
  assert sa == sb == TRAINED_STEPS
  chex.assert_trees_all_equal(a, b)
  assert sorted(int(n) for n in _names(workdir / "checkpoints")
                if n.isdigit()) == sorted({8, preempted, TRAINED_STEPS})
  assert not (workdir / lock_lib.LOCK_NAME).exists()
  config = json.loads((workdir / "config.json").read_text())
  assert config["total_steps"] == TRAINED_STEPS

  # metrics.jsonl, rewritten whole (no append on a bucket): the rows of
  # both starts, the losses of the local run.
  def losses(text):
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines())
            if "loss" in r}
  got = losses((workdir / "metrics.jsonl").read_text())
  want = losses((ref / "metrics.jsonl").read_text())
  assert got == want and sorted(got) == [4, 8, 12, 16]

  # TensorBoard's own reader, through its fsspec (gcsfs) filesystem.
  reader = subprocess.run(
      [sys.executable, "-c", _TB_READER, url], capture_output=True,
      text=True, timeout=120, env=dict(os.environ))
  assert reader.returncode == 0, reader.stderr[-3000:]
  scalars = json.loads(reader.stdout.strip().splitlines()[-1])
  assert {s for s, _ in scalars} == {4, 8, 12, 16}
  for s, v in scalars:
    assert v == pytest.approx(want[s], rel=1e-6)

  # load_encoder, linear_eval and convert to-torch read it from gs://.
  _, local_vars = byol_jax.load_encoder(str(ref))
  _, gcs_vars = byol_jax.load_encoder(url, which="online")
  chex.assert_trees_all_equal(local_vars, gcs_vars)
  from byol_jax.interop import convert_torch  # pylint: disable=g-import-not-at-top
  from byol_jax import linear_eval  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  for name, source in (("local", str(ref)), ("gcs", url)):
    convert_torch.export(source, str(tmp_path / f"{name}.safetensors"))
  a, b = (safetensors.numpy.load_file(str(tmp_path / f"{n}.safetensors"))
          for n in ("local", "gcs"))
  chex.assert_trees_all_equal(a, b)
  summary = linear_eval.run(url, steps=2, batch_size=64, eval_batch_size=200)
  written = json.loads((workdir / "linear_eval.json").read_text())
  assert summary["output"] == f"{url}/linear_eval.json"
  assert written["checkpoint_step"] == TRAINED_STEPS
  assert np.isfinite(written["train_loss"])


# TensorBoard without TensorFlow (as `pip install tensorboard` alone): its
# gfile reads gs:// through fsspec, i.e. gcsfs, which follows the emulator.
_TB_READER = """
import json, sys
sys.modules["tensorflow"] = None
from tensorboard.backend.event_processing import event_accumulator
acc = event_accumulator.EventAccumulator(sys.argv[1])
acc.Reload()
print(json.dumps([(e.step, e.value) for e in acc.Scalars("loss")]))
"""


def test_missing_gcs_client_is_one_line_before_anything():
  """Without gcsfs the trainer says what to install, before it starts."""
  proc = subprocess.run(
      [sys.executable, "-c", "import sys; sys.modules['gcsfs'] = None; "
       "import runpy; runpy.run_module('byol_jax.train', "
       "run_name='__main__', alter_sys=True)",
       "--config=configs/tiny.py", "--workdir=gs://byol-test/nothing"],
      cwd=REPO, env=train_env(2), capture_output=True, text=True,
      timeout=120)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert len(errors) == 1 and "pip install 'byol_jax[gcs]'" in errors[0]
  assert "Traceback" not in proc.stderr


# ------------------------------------------------------- TFDS in a bucket ----
def test_prepare_into_a_bucket_and_train_from_it(gcs_bucket, tf_gcs_env,
                                                  cifar_npz, tmp_path):
  """`prepare --data_dir=gs://...` writes a TFDS dataset (a builder of the
  tests over real CIFAR-10 JPEGs) into the bucket, and a run trains from that
  data_dir: TFDS's record files through TensorFlow's GCS filesystem, its
  metadata and everything of byol_jax's through gcsfs, both on the emulator."""
  tfds_builders = pytest.importorskip("tfds_builders")
  data_dir = f"{gcs_bucket}/tfds-{uuid.uuid4().hex[:6]}"
  served = tmp_path / "served"
  served.mkdir()
  tfds_builders.write_download_archive(cifar_npz, served, n_train=64,
                                       n_test=32)
  env = dict(train_env(2), **tf_gcs_env,
             PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
  with tfds_builders.serve(served) as url:
    env[tfds_builders.DOWNLOAD_URL_ENV] = (
        f"{url}/{tfds_builders.DOWNLOAD_ARCHIVE}")
    proc = subprocess.run(
        [sys.executable, "-m", "byol_jax.prepare", "--imports=tfds_builders",
         "--dataset=byol_test_download", f"--data_dir={data_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "test 32, train 64 examples" in proc.stdout, proc.stdout
  written = [p.name for p in epath.Path(
      f"{data_dir}/byol_test_download").iterdir()]
  assert written, "nothing in the bucket"

  config = tmp_path / "tfds_config.py"
  config.write_text(_TFDS_CONFIG.format(tests=str(REPO / "tests"),
                                        tiny=str(REPO / "configs" / "tiny.py"),
                                        data_dir=data_dir))
  proc = subprocess.run(
      [sys.executable, "-m", "byol_jax.train", f"--config={config}",
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert checkpoint_steps(tmp_path / "run") == [4]
  assert "byol_test_download" in proc.stdout  # The records name the data.
  assert "online_top1" in proc.stdout  # Labels and the test split read.


_TFDS_CONFIG = """
import importlib.util, sys
sys.path.insert(0, {tests!r})
import tfds_builders  # Registers the builders with TFDS.

def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  c = tiny.get_config("batch=16,steps=4")
  c.data.source = "tfds"
  c.data.name = "byol_test_download"
  c.data.data_dir = {data_dir!r}
  c.data.num_classes = -1
  c.data.eval_split = ""
  c.model.num_filters = 4
  c.projector.hidden_dim = c.predictor.hidden_dim = 32
  c.knn.enabled = False
  return c
"""


# ------------------------------------------------- SIGTERM while busy ----
_BUSY = """
import sys, time
from byol_jax.trainer import preempt
guard = preempt.Guard().__enter__()
guard.saves_with(lambda step, state: open(sys.argv[1], "w").write(
    f"{step} {state}"))
guard.on_exit(lambda: print("lock released", flush=True))
newer = (7, "state-7") if sys.argv[2] == "newer" else None
with guard.busy("evaluating", newer=newer):
  print("busy", flush=True)
  time.sleep(120)
"""


@pytest.mark.parametrize("newer", ["newer", "saved"])
def test_sigterm_while_busy_saves_only_a_newer_state(tmp_path, newer):
  """The watcher ends a process whose main thread is busy: it saves the
  state the main thread registered as newer than the last checkpoint, and
  nothing otherwise; then the exit callbacks (the lock), exit 143."""
  out = tmp_path / "saved.txt"
  proc = _start([sys.executable, "-c", _BUSY, str(out), newer])
  _until(proc, "busy")
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 143, stderr
  assert time.monotonic() - sent < 10
  assert "lock released" in stdout
  if newer == "newer":
    assert out.read_text() == "7 state-7"
    assert "Preempted while evaluating: saved step 7" in stdout
  else:
    assert not out.exists()
    assert "nothing newer than the last checkpoint to save" in stdout


# -------------------------------------------------------- container restart ----
def _children(pid: int) -> list[int]:
  found = []
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/children") as f:
      found += [int(c) for c in f.read().split()]
  return found


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="a PID namespace needs root and unshare(1)")
def test_container_restart_resumes_as_pid_1(tmp_path, trained_run,
                                            train_cmd):
  """SIGKILL of a trainer that is pid 1 of its PID namespace (a container),
  then the same command started the same way: it takes over the lock at
  once (the dead holder's flock is gone, though its pid is 1 again)."""
  ref, _ = trained_run
  workdir = tmp_path / "run"
  cmd = ["unshare", "-p", "-f", "--mount-proc",
         *train_cmd(workdir, f"steps={TRAINED_STEPS}", *FLAGS)]
  first = _start(cmd)
  try:
    # Killed as soon as the first checkpoint is complete on disk (the
    # console says so only at the next log step, too close to the end).
    deadline = time.monotonic() + 300
    while not checkpoint_steps(workdir):
      assert first.poll() is None and time.monotonic() < deadline
      time.sleep(0.02)
    holder = json.loads((workdir / lock_lib.LOCK_NAME).read_text())
    assert holder["pid"] == 1  # The trainer is the namespace's init.
    (init,) = _children(first.pid)
    os.kill(init, signal.SIGKILL)  # The whole namespace dies with it.
    first.communicate(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
  saved = checkpoint_steps(workdir)
  assert saved and saved[-1] < TRAINED_STEPS, saved
  rows = (workdir / "metrics.jsonl").read_text().splitlines()
  was = [json.loads(l)["elapsed_seconds"] for l in rows if "elapsed" in l]
  # A newer checkpoint whose OCDBT manifest is empty (a copy of the last one,
  # the file emptied): quarantined, with no traceback on the console.
  damaged = workdir / "checkpoints" / str(saved[-1] + 4)
  shutil.copytree(workdir / "checkpoints" / str(saved[-1]), damaged)
  (damaged / "state" / "manifest.ocdbt").write_bytes(b"")
  started = time.monotonic()
  second = _start(cmd)
  head = _until(second, f"Resuming from step {saved[-1]}.")
  assert time.monotonic() - started < 60
  out, err = second.communicate(timeout=300)
  out = "".join(head) + out
  assert second.returncode == 0, err[-3000:]
  assert "Taking over the lock" in out and out.count("Taking over") == 1
  assert "Traceback" not in err, err[-3000:]
  # The elapsed time went on from the killed run's.
  now = [json.loads(l)["elapsed_seconds"] for l in (
      workdir / "metrics.jsonl").read_text().splitlines()[len(rows):]
         if "elapsed" in l]
  assert was and now and was[-1] < now[0] < was[-1] + time.monotonic() - started
  assert [p.name.split("-")[0] for p in
          (workdir / "checkpoints_damaged").iterdir()] == [damaged.name]
  (_, a, sa), (_, b, sb) = (pretrained.load_run(str(ref)),
                            pretrained.load_run(str(workdir)))
  assert sa == sb == TRAINED_STEPS
  chex.assert_trees_all_equal(a, b)  # Bit for bit.
  assert not (workdir / lock_lib.LOCK_NAME).exists()


# -------------------------------------------------------------- the lock ----
@pytest.fixture
def fast_heartbeat(monkeypatch):
  monkeypatch.setattr(lock_lib, "HEARTBEAT_SECONDS", 0.3)
  monkeypatch.setattr(lock_lib, "STALE_SECONDS", 1.5)
  monkeypatch.setattr(lock_lib, "_POLL_SECONDS", 0.1)


def _foreign(heartbeat: float, **extra) -> str:
  return json.dumps(dict(host="other-host", pid=4321, boot_id="other-boot",
                         pid_ns="pid:[1]", start_ticks=5, token=99,
                         started=heartbeat, heartbeat=heartbeat, **extra))


@pytest.fixture(params=["local", "gcs"])
def lock_dir(request, tmp_path):
  if request.param == "local":
    return epath.Path(tmp_path / "run")
  bucket = request.getfixturevalue("gcs_bucket")
  return epath.Path(f"{bucket}/lock-{uuid.uuid4().hex[:6]}")


def test_lock_from_another_host(lock_dir, fast_heartbeat, capsys):
  """Old heartbeat: taken over at once. Fresh but unmoving (the holder died
  a moment ago): taken over after the watch. Moving: refused."""
  path = lock_dir / lock_lib.LOCK_NAME
  lock_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(_foreign(time.time() - 3600))
  lock = lock_lib.WorkdirLock(lock_dir)
  lock.acquire()
  assert json.loads(path.read_text())["pid"] == os.getpid()
  lock.release()
  assert not path.exists()
  assert capsys.readouterr().out.count("Taking over the lock") == 1

  path.write_text(_foreign(time.time()))
  start = time.monotonic()
  lock = lock_lib.WorkdirLock(lock_dir)
  lock.acquire()
  assert time.monotonic() - start >= lock_lib.STALE_SECONDS
  lock.release()

  stop = threading.Event()
  def beat():  # A live trainer on another host.
    while not stop.wait(lock_lib.HEARTBEAT_SECONDS):
      path.write_text(_foreign(time.time()))
  path.write_text(_foreign(time.time()))
  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    with pytest.raises(ConfigError, match="pid 4321 on host other-host"):
      lock_lib.WorkdirLock(lock_dir).acquire()
  finally:
    stop.set()
    thread.join()
  assert json.loads(path.read_text())["token"] == 99  # Not touched.


def test_lock_same_host_pid_reused_or_alive(tmp_path):
  """Same kernel and pid namespace: a live pid with another start time is
  a reused pid (dead holder); the live holder itself is refused."""
  workdir = epath.Path(tmp_path / "run")
  held = lock_lib.WorkdirLock(workdir)
  held.acquire()
  record = json.loads((workdir / lock_lib.LOCK_NAME).read_text())
  assert record["pid"] == os.getpid() and record["boot_id"]
  with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
    lock_lib.WorkdirLock(workdir).acquire()  # Its flock is held.
  held.release()
  # A bucket has no flock: the pid and its start time decide.
  record["start_ticks"] += 1  # The same pid, started at another time.
  lock = lock_lib.WorkdirLock(workdir)
  assert not lock._alive(record)  # pylint: disable=protected-access
  record["start_ticks"] -= 1
  assert lock._alive(record)  # pylint: disable=protected-access
