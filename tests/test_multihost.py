"""Multi-host correctness: 2 local processes x 4 CPU devices vs 1 x 8.

The processes join through `jax.distributed.initialize` on localhost (CPU
collectives: gloo), each reads only its share of every global batch (host
tf.data pipeline), they train the tiny config, save Orbax checkpoints from
both processes mid-run and at the end, and restore them (tests/
multihost_worker.py asserts restored == saved, in the job). Here: both
processes hold the same final state, and it matches a one-process run on 8
devices that sees the same global batches (each step's loss too). Every
process runs under a time limit. Through the trainer's command line: a job
that loses a process (process 0 after joining, process 1 while compiling) stops
by itself within 30 s, one error line per survivor and no lock left; SIGTERM
during the first compilation ends both processes within 10 s.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from testlib import FAST_COMPILE_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
# Two steps, a checkpoint after each (mid-run and final). Step 1 runs at
# learning rate 0 (warm-up), step 2 moves the parameters. Why not more: from
# step 3 on, float round-off (reductions in another order) grows past 1e-3 of
# some leaves' scale (zero-initialised BN biases, LARS) even between two
# one-process runs on 4 and on 8 devices, so the tight check would be noise.
STEPS, CHECKPOINT_EVERY = 2, 1
TIMEOUT_S = 420  # per job; the workers also time themselves out.


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  # Faster compiling (most of this test's time); every run uses it, the
  # reference too.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      + FAST_COMPILE_FLAGS)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["PYTHONUNBUFFERED"] = "1"
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


_JOBS = []


@pytest.fixture(autouse=True)
def _kill_leftover_workers():
  """No worker outlives its test (e.g. one interrupted while waiting)."""
  yield
  while _JOBS:
    _JOBS.pop().kill()


class Job:
  """Worker processes started together; output goes to files (no pipe fills)."""

  def __init__(self, tmp: pathlib.Path, name: str, npz, num_processes: int,
               devices: int, extra=None, nice: int = 0, workdir=None):
    self.procs, self.logs, self.outs = [], [], []
    _JOBS.append(self)
    self.workdir = workdir or tmp / name / "run"
    port = _free_port() if num_processes > 1 else None
    for p in range(num_processes):
      log = tmp / name / f"log{p}.txt"
      out = tmp / name / f"state{p}.npz"
      log.parent.mkdir(parents=True, exist_ok=True)
      cmd = [sys.executable, str(WORKER), f"--workdir={self.workdir}",
             f"--npz={npz}", f"--out={out}", f"--steps={STEPS}",
             f"--checkpoint_every={CHECKPOINT_EVERY}"]
      if num_processes > 1:
        cmd += [f"--coordinator_address=localhost:{port}",
                f"--num_processes={num_processes}", f"--process_id={p}"]
      cmd += (extra or {}).get(p, [])
      with open(log, "wb") as f:
        self.procs.append(subprocess.Popen(
            cmd, cwd=REPO, env=_env(devices), stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None))
      self.logs.append(log)
      self.outs.append(out)

  def output(self, tail: int = 6000) -> str:
    text = []
    for p, log in enumerate(self.logs):
      lines = [l for l in log.read_text(errors="replace").splitlines()
               if "[Gloo]" not in l]
      text.append(f"--- process {p} (exit {self.procs[p].returncode}) ---\n"
                  + "\n".join(lines)[-tail:])
    return "\n".join(text)

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # The worker's own session.
    for proc in self.procs:
      proc.wait()

  def wait(self, deadline: float) -> list[int | None]:
    """Exit codes; None for those still running at `deadline` (killed)."""
    codes = []
    for proc in self.procs:
      try:
        codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0)))
      except subprocess.TimeoutExpired:
        codes.append(None)
    self.kill()
    return codes


def _load(path) -> dict[int, dict[str, np.ndarray]]:
  """{step: {leaf path: array}} from a worker's --out file."""
  by_step = {}
  with np.load(path) as f:
    for key in f.files:
      step, leaf = key.split("/", 1)
      by_step.setdefault(int(step), {})[leaf] = f[key]
  return by_step


def _assert_close(ref: dict, got: dict, what: str) -> None:
  """|diff| <= rtol * max|leaf| + 1e-4, leaf by leaf (reduction order).

  rtol is 1e-3 for parameters and statistics and 3e-2 for the optimizer's
  momentum traces: those are raw gradients, and a batch-norm parameter's
  gradient is a sum that nearly cancels (BN's backward pass subtracts the
  batch mean), so the order of the 8-way reduction moves it by up to 0.8% of
  its largest entry (measured; the losses of the two runs agree to 3e-7).
  The BN biases start at 0 and after 2 warm-up steps are such gradients
  times a small lr (measured |diff| <= 3.2e-5 on leaves of 5e-3), hence the
  absolute 1e-4. A gradient that missed the other process's half of the
  batch would be off by the order of the leaf or of a whole step.
  """
  assert ref.keys() == got.keys(), f"{what}: {sorted(ref.keys() ^ got.keys())}"
  bad = []
  for k, a in ref.items():
    b = got[k]
    assert a.shape == b.shape and a.dtype == b.dtype, (what, k)
    if a.dtype.kind in "iub":
      if not np.array_equal(a, b):
        bad.append(f"{k}: {a} vs {b}")
      continue
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = np.max(np.abs(a), initial=0.0)
    err = np.max(np.abs(a - b), initial=0.0)
    rtol = 3e-2 if k.startswith(".opt_state") else 1e-3
    if not err <= rtol * scale + 1e-4:
      bad.append(f"{k}: max|diff| {err:.3g}, max|leaf| {scale:.3g}")
  assert not bad, f"{what}: {len(bad)} of {len(ref)} leaves differ:\n" + (
      "\n".join(bad[:20]))


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
          .splitlines() if l.strip()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit())


def test_two_processes_match_one_and_restore(tmp_path, cifar_npz):
  start = time.monotonic()
  # The one-process reference runs beside the 2-process job, at a lower
  # priority: it takes the CPU the two leave while they wait on each other,
  # and does not hold one of them back.
  multi = Job(tmp_path, "multi", cifar_npz, num_processes=2, devices=4)
  single = Job(tmp_path, "single", cifar_npz, num_processes=1, devices=8,
               nice=19)
  deadline = time.monotonic() + TIMEOUT_S
  codes = multi.wait(deadline) + single.wait(deadline)
  elapsed = time.monotonic() - start
  report = f"after {elapsed:.0f}s:\n{multi.output()}\n{single.output()}"
  assert codes == [0, 0, 0], f"exit codes {codes} {report}"
  for p in range(2):
    log = multi.logs[p].read_text()
    assert f"worker {p}/2: 4 local, 8 devices" in log, report
    assert f"restored steps [{CHECKPOINT_EVERY}, {STEPS}] equal the saved " \
           "states" in log, report
  assert f"step {STEPS}/{STEPS}" in multi.logs[0].read_text(), report
  assert not [l for l in multi.logs[1].read_text().splitlines()
              if l.startswith("step ")], "process 1 logged: " + report
  assert _checkpoint_steps(multi.workdir) == [CHECKPOINT_EVERY, STEPS]

  p0, p1 = _load(multi.outs[0]), _load(multi.outs[1])
  ref = _load(single.outs[0])
  assert sorted(p0) == sorted(p1) == sorted(ref) == [CHECKPOINT_EVERY, STEPS]
  for step in sorted(ref):
    # Both processes saved the same (replicated) state, bit for bit.
    assert p0[step].keys() == p1[step].keys()
    differ = [k for k in p0[step] if not np.array_equal(p0[step][k],
                                                        p1[step][k])]
    assert not differ, f"step {step}: processes 0 and 1 differ in {differ}"
    # ... which is the one-process, 8-device state (same global batches).
    _assert_close(ref[step], p0[step], f"step {step}, 1x8 vs 2x4")
  assert int(p0[STEPS][".step"]) == STEPS
  # Orbax's save decisions needed no device, and both processes agreed.
  decisions = [[l.split("decisions ")[1] for l in log.read_text().splitlines()
                if "decisions " in l] for log in multi.logs]
  assert decisions[0] and decisions[0] == decisions[1], decisions
  # The 2-process checkpoint loads on other layouts: 1 process with 1 and
  # with 8 devices (load_encoder and the trainer's restore).
  # (Both at once: they only read.)
  loaders = {devices: Job(tmp_path, f"load{devices}", cifar_npz,
                          num_processes=1, devices=devices,
                          workdir=multi.workdir,
                          extra={0: [f"--load_from={multi.outs[0]}"]})
             for devices in (1, 8)}
  for devices, job in loaders.items():
    codes = job.wait(time.monotonic() + 180)
    assert codes == [0], job.output()
    assert f"loaded on {devices} devices" in job.logs[0].read_text()
  # The run moved: the comparison is not between two initial states.
  moved = [k for k in ref[STEPS] if k.startswith(".params")
           and not np.array_equal(ref[STEPS][k], ref[CHECKPOINT_EVERY][k])]
  assert moved
  # Each step's loss (process 0's metrics.jsonl) is the one-process loss.
  losses = [_losses(job.workdir) for job in (multi, single)]
  assert sorted(losses[0]) == list(range(1, STEPS + 1)), losses
  np.testing.assert_allclose([losses[0][s] for s in sorted(losses[0])],
                             [losses[1][s] for s in sorted(losses[0])],
                             rtol=1e-5)
  print(f"2x4 vs 1x8 in {elapsed:.0f}s")


def _trainer(tmp: pathlib.Path, npz, port: int, p: int) -> list[str]:
  """`python -m byol_jax.train` as process `p` of a 2-process job."""
  return [sys.executable, "-m", "byol_jax.train",
          f"--config={REPO / 'configs' / 'tiny.py'}:path={npz},batch=16,"
          "steps=100000", f"--workdir={tmp / 'run'}",
          "--config.model.num_filters=4", "--config.projector.hidden_dim=32",
          "--config.predictor.hidden_dim=32", "--config.knn.enabled=False",
          "--config.data.on_device=False", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2", "--multihost=yes",
          f"--coordinator_address=localhost:{port}", "--num_processes=2",
          f"--process_id={p}"]


def _start_job(tmp_path, cifar_npz, port, env):
  """Both trainers of a 2-process job, each logging to tmp_path/logP.txt."""
  procs, logs = [], []
  for p in range(2):
    logs.append(tmp_path / f"log{p}.txt")
    with open(logs[-1], "wb") as f:
      procs.append(subprocess.Popen(
          _trainer(tmp_path, cifar_npz, port, p), cwd=REPO, env=env,
          stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
  return procs, logs


def _kill_leftovers(procs):
  """SIGKILL to the session of every trainer still running, then reaps all."""
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_for(text, procs, logs):
  """Until process 0's log has `text`; fails if either process ends."""
  deadline = time.monotonic() + 300
  while text not in logs[0].read_text(errors="replace"):
    assert time.monotonic() < deadline, "the job did not start in time"
    assert procs[0].poll() is None and procs[1].poll() is None, (
        logs[0].read_text()[-3000:], logs[1].read_text()[-3000:])
    time.sleep(0.1)


@pytest.mark.parametrize("victim,when", [(0, "Starting from step 0."),
                                         (1, "Compiling the train step")])
def test_a_lost_process_stops_the_job_cleanly(tmp_path, cifar_npz, victim,
                                              when):
  """SIGKILL of one trainer of a 2-process job (process 0, which hosts JAX's
  coordination service and holds the lock, right after start-up; process 1
  while the train step compiles): the other exits non-zero within 30 s (JAX's heartbeat timeout,
  15 s by default), with one error line and no C++ stack trace, and no lock
  is left in the workdir."""
  port = _free_port()
  env = dict(_env(4), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  procs, logs = _start_job(tmp_path, cifar_npz, port, env)
  survivor = 1 - victim
  try:
    _wait_for(when, procs, logs)
    # One lock for the job, held by process 0.
    holder = json.loads((tmp_path / "run" / "trainer.lock").read_text())
    assert holder["pid"] == procs[0].pid, holder
    assert [p.name for p in (tmp_path / "run").iterdir()
            if "lock" in p.name] == ["trainer.lock"]
    os.killpg(procs[victim].pid, signal.SIGKILL)
    killed = time.monotonic()
    code = procs[survivor].wait(timeout=60)
    took = time.monotonic() - killed
  finally:
    _kill_leftovers(procs)
  lock = tmp_path / "run" / "trainer.lock"
  for _ in range(100):  # The stderr filter finishes after the trainer.
    if not lock.exists():
      break
    time.sleep(0.1)
  text = logs[survivor].read_text(errors="replace")
  report = f"process {survivor} (exit {code}, {took:.1f}s):\n{text[-4000:]}"
  assert code != 0 and took < 30, report
  errors = [l for l in text.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "lost a process" in errors[0], report
  assert "stack trace" not in text and "Traceback" not in text, report
  assert not lock.exists(), report
  print(f"process {survivor} stopped {took:.1f}s after process {victim}: "
        f"{errors[0][:120]}")


def test_sigterm_while_the_job_compiles_ends_it(tmp_path, cifar_npz):
  """SIGTERM to both processes of a job during the first compilation (no
  compilation cache: it takes seconds): JAX's notifier owns SIGTERM there;
  the trainers see its notice and both exit 143 within 10 s, lock released."""
  port = _free_port()
  env = dict(_env(4), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             JAX_ENABLE_COMPILATION_CACHE="false")
  procs, logs = _start_job(tmp_path, cifar_npz, port, env)
  try:
    _wait_for("Compiling the train step", procs, logs)
    sent = time.monotonic()
    for proc in procs:
      proc.send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=60) for proc in procs]
    took = time.monotonic() - sent
  finally:
    _kill_leftovers(procs)
  report = f"exit {codes} after {took:.1f}s:\n" + "\n".join(
      log.read_text(errors="replace")[-2000:] for log in logs)
  assert codes == [143, 143] and took < 10, report
  assert "Preempted while compiling the train step" in logs[0].read_text()
  assert not any(l.startswith("error:") for log in logs
                 for l in log.read_text().splitlines()), report
  assert not (tmp_path / "run" / "trainer.lock").exists()
  print(f"both processes ended {took:.1f}s after SIGTERM")
