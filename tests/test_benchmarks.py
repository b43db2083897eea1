"""benchmarks/: the GPU suite's CPU dry run, its planner and stage runner, and
step_throughput's FLOP accounting against the 8-forward estimate."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from testlib import REPO, load_config, train_env

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_suite  # noqa: E402  (benchmarks/gpu_suite.py)
import pack_images  # noqa: E402  (benchmarks/pack_images.py)
import step_throughput  # noqa: E402  (benchmarks/step_throughput.py)

# Makes `import tensorflow` fail in every Python process that sees it on
# PYTHONPATH, as on a GPU machine without TensorFlow (CI has it installed).
_NO_TF = ("import sys\n"
          "for _name in ('tensorflow', 'tensorflow_datasets'):\n"
          "  sys.modules[_name] = None\n")

RUN_FILES = ("suite.json", "throughput_0.json", "throughput.log",
             "cifar_train.log", "cifar_metrics.jsonl", "cifar_config.json")


@pytest.fixture(scope="module")
def no_tf_env(tmp_path_factory) -> dict:
  """One CPU device, TensorFlow unimportable, the tests' Python as PYTHON."""
  shim = tmp_path_factory.mktemp("no_tf")
  (shim / "sitecustomize.py").write_text(_NO_TF)
  env = train_env(1)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
  env["PYTHON"] = sys.executable
  return env


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory, no_tf_env, cifar_npz):
  """One `benchmarks/gpu_suite.sh --tiny` run: (process, its run folder)."""
  tmp = tmp_path_factory.mktemp("suite")
  proc = subprocess.run(
      ["bash", "benchmarks/gpu_suite.sh", "--tiny", f"--data={cifar_npz}",
       f"--results_root={tmp / 'results'}", f"--workdir_root={tmp / 'work'}",
       "--budget_s=420"],
      cwd=REPO, env=no_tf_env, capture_output=True, text=True, timeout=600)
  runs = sorted((tmp / "results").iterdir()) if (tmp / "results").exists() \
      else []
  assert proc.returncode == 0 and len(runs) == 1, (
      f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc, runs[0]


def test_suite_script_is_strict_and_shellchecked():
  script = REPO / "benchmarks" / "gpu_suite.sh"
  text = script.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert os.access(script, os.X_OK)
  syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True,
                          text=True, timeout=60)
  assert syntax.returncode == 0, syntax.stderr
  if shutil.which("shellcheck") is None:
    pytest.skip("the shellcheck binary is not installed")
  check = subprocess.run(["shellcheck", "--shell=bash", str(script)],
                         capture_output=True, text=True, timeout=60)
  assert check.returncode == 0, check.stdout + check.stderr


def test_shim_makes_tensorflow_unimportable(no_tf_env):
  proc = subprocess.run([sys.executable, "-c", "import tensorflow"],
                        env=no_tf_env, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode != 0
  assert "ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr


def test_tiny_suite_writes_what_it_promises(tiny_suite):
  _, run = tiny_suite
  assert run.name.startswith("suite_tiny_") and run.name.endswith("_cpu")
  assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
  report = json.loads((run / "suite.json").read_text())
  assert report["ok"] and report["tiny"] and report["within_budget"]
  assert report["device"]["platform"] == "cpu"
  assert [s["status"] for s in report["stages"]] == ["ok", "ok"]
  rows = {(r["case"], r["per_device_batch"]): r for r in report["throughput"]}
  assert set(rows) == {("tiny", 8)}
  timed = rows[("tiny", 8)]
  for key in ("images_per_sec", "supervised_images_per_sec",
              "ratio_to_supervised", "step_flops", "forward_flops_per_image",
              "peak_bytes_estimate"):
    assert timed[key] > 0, key
  assert timed["mfu"] is None  # No peak FLOP/s is known for a CPU.

  cifar = report["cifar"]
  assert cifar["sizing"] == "measured_step_time"
  assert 1 <= cifar["total_steps"] <= 8
  assert cifar["status"] == "ok"
  assert cifar["final_step"] == cifar["total_steps"]
  assert cifar["evals"], "no kNN evaluation was recorded"
  for e in cifar["evals"]:
    assert 0.0 <= e["eval/knn_top1"] <= 1.0
  assert cifar["evals"][-1]["step"] == cifar["total_steps"]
  assert cifar["last_train"]["loss"] > 0

  metrics = [json.loads(l) for l in
             (run / "cifar_metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["step"] == cifar["total_steps"]
  config = json.loads((run / "cifar_config.json").read_text())
  assert config["total_steps"] == cifar["total_steps"]
  assert config["eval_every_steps"] == cifar["eval_every_steps"]
  assert config["model"]["dtype"] == "bfloat16"  # As stage 1 timed it.
  assert "done: steps 0-" in (run / "cifar_train.log").read_text()
  assert "$ " in (run / "throughput.log").read_text()
  throughput = json.loads((run / "throughput_0.json").read_text())
  assert throughput["device_kind"] == "cpu" and "note" in throughput
  assert set(throughput["versions"]) >= {"jax", "flax", "optax"}
  assert len(throughput["load_average"]["start"]) == 3


def test_step_flops_are_about_eight_forwards(tiny_suite):
  """configs/tiny.py, batch 8, bf16: XLA's FLOPs of the compiled BYOL step.

  A BYOL step is about 8 encoder forwards per image: 2 views x (forward +
  backward ~ 3 forwards) + 2 target forwards; a supervised step about 3.
  Measured on CPU (XLA cost analysis): 8.14 and 3.01 forwards, as for
  ResNet-18 CIFAR at the same batch (heads, augmentations and optimizer are
  the excess, large at batch 8). The bounds [7.8, 8.6] and [2.9, 3.2] fail
  if a backward pass, a view or the target forwards went missing or were
  counted twice (<= 7 or >= 9).
  """
  run = tiny_suite[1]
  rows = json.loads((run / "throughput_0.json").read_text())["results"]
  row = next(r for r in rows if r["case"] == "tiny")
  assert row["per_device_batch"] == 8 and row["dtype"] == "bfloat16"
  assert row["forward_flops_per_image"] > 0
  assert 7.8 <= row["step_forwards"] <= 8.6
  assert 2.9 <= row["supervised_forwards"] <= 3.2
  assert row["step_flops_over_8_forwards"] == pytest.approx(
      row["step_forwards"] / 8)
  memory = row["memory"]
  assert memory["temp_size_in_bytes"] > 0
  assert memory["peak_bytes_estimate"] == (
      memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] -
      memory["alias_size_in_bytes"] + memory["temp_size_in_bytes"])
  # The donated state is aliased: its outputs reuse the argument buffers.
  assert memory["alias_size_in_bytes"] > 0.9 * memory["output_size_in_bytes"]


@pytest.mark.parametrize("case,name", [("r18_cifar", "byol_cifar10"),
                                       ("r50_224", "byol_r50")])
def test_benchmark_configs_are_the_config_files(case, name):
  """Only the batch, the schedule length and the dtype differ."""
  bench = step_throughput.make_config(case, 64, "bfloat16").to_dict()
  real = load_config(name).to_dict()
  for key in ("batch_size", "total_steps"):
    bench.pop(key), real.pop(key)
  assert bench.pop("model").pop("dtype") == "bfloat16"
  real.pop("model").pop("dtype")
  assert bench == real


def test_plan_fits_the_measured_step_into_the_time_left():
  mode = gpu_suite.full_mode(1)
  # Reserve: start-up 40 + 2 x compile 10 + 4 evals x 20 + final 45 = 185 s;
  # (1000 - 185) / (1.25 x 0.5 s) = 1304 steps; evaluations every 1304 // 4
  # = 326 steps, rounded down to whole epochs of 195 steps.
  assert gpu_suite.plan(1000, 0.5, 10, 195, mode) == dict(
      total_steps=1304, eval_every_steps=195, sizing="measured_step_time")
  # (3000 - 185) / 0.625 = 4504 steps, 4504 // 4 = 1126 -> 5 epochs of 195.
  assert gpu_suite.plan(3000, 0.5, 10, 195, mode) == dict(
      total_steps=4504, eval_every_steps=975, sizing="measured_step_time")
  assert gpu_suite.plan(100, 0.5, 10, 195, mode)["total_steps"] == 0
  # The dry run is capped at max_steps (8) with its one evaluation at the end.
  tiny = gpu_suite.tiny_mode()
  assert gpu_suite.plan(1000, 0.01, 1, 625, tiny) == dict(
      total_steps=tiny.max_steps, eval_every_steps=tiny.max_steps,
      sizing="measured_step_time")
  assert tiny.max_steps == 8 and tiny.evals == 1
  # No measured step: as many steps as allowed, and the deadline stops it.
  assert gpu_suite.plan(1000, None, None, 195, mode)["sizing"] == "sigterm"


def test_stage_runner_sigterm_at_the_deadline_is_stopped_on_time(tmp_path):
  """A stage still running at its deadline gets SIGTERM; exit 143 is on time.

  SIGTERM is blocked in the child until it has installed its handler (the
  mask is inherited), so the result does not depend on start-up speed.
  """
  child = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
           "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})\n"
           "time.sleep(120)\n")
  log = tmp_path / "log"
  old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
  try:
    start = time.time()
    stage = gpu_suite.run_stage("child", [sys.executable, "-c", child],
                                str(log), stop_at=time.time() + 1,
                                grace_s=60)
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
  assert stage["status"] == "stopped_on_time" and stage["sigterm_sent"]
  assert stage["returncode"] == 143
  assert time.time() - start < 60
  assert log.read_text().startswith(f"$ {sys.executable} -c")

  failing = gpu_suite.run_stage("fails", [sys.executable, "-c", "raise "
                                          "SystemExit(3)"], str(log),
                                stop_at=time.time() + 60, grace_s=5)
  assert failing["status"] == "failed" and failing["returncode"] == 3
  assert not failing["sigterm_sent"]


def test_pack_images_round_trip(tmp_path):
  """An image folder packs into the npz layout the trainer reads."""
  files = {}
  for split, classes in (("train", ("cat", "dog")), ("test", ("dog",))):
    for c, cls in enumerate(classes):
      folder = tmp_path / "root" / split / cls
      folder.mkdir(parents=True)
      for i in range(2):
        path = folder / f"{i}.jpg"
        Image.fromarray(np.full((8, 8, 3), 40 * (c + i), np.uint8)).save(path)
        files[(split, cls, i)] = path.read_bytes()
  counts = pack_images.pack(str(tmp_path / "root"), str(tmp_path / "p.npz"))
  assert counts == {"test": 2, "train": 4}
  d = np.load(tmp_path / "p.npz")
  assert list(d["class_names"]) == ["cat", "dog"]
  assert list(d["train_labels"]) == [0, 0, 1, 1]
  assert list(d["test_labels"]) == [1, 1]
  off = d["test_offsets"]
  assert d["test_jpeg"][off[1]:off[2]].tobytes() == files[("test", "dog", 1)]
