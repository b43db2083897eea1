"""Helpers shared by the tests (not tests themselves)."""
import contextlib
import importlib.util
import os
import pathlib
import re

import jax
import numpy as np

from byol_jax.core import methods
from byol_jax.core import optim
from byol_jax.core import step as step_lib
from byol_jax.core import train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Small enough for a 2-core CI machine: 4 base filters, 32 px, batch 16.
NARROW = dict(batch=16, filters=4, hidden=32)
TRAINED_STEPS = 16  # As the container-restart and gs:// runs: one compiled step.


def load_config(name: str, arg: str | None = None):
  """configs/NAME.py's get_config(arg)."""
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# XLA:CPU flags that make the tests' tiny programs compile with less CPU time:
# LLVM at optimisation level 0 (about a third faster), and the classic
# fusion emitters (the new ones split each program for parallel codegen:
# about a quarter more CPU time on the tests' steps, measured cold).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0"
                      " --xla_cpu_use_fusion_emitters=false")


def train_env(devices: int = 8, optimize: bool = False) -> dict:
  """Environment of a trainer subprocess on `devices` CPU devices.

  `optimize`: XLA's full CPU optimisations, for runs of hundreds of steps;
  otherwise FAST_COMPILE_FLAGS.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" + (
      "" if optimize else " " + FAST_COMPILE_FLAGS)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def rel_err(a, b) -> float:
  """|a - b| / |b| over all elements, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def checkpoint_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith("error:")]


# absl's log format ('I1206 20:17:13.123 ...', 'W0000 00:00:...').
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


def noisy_lines(console: str) -> list[str]:
  """Lines a command's quiet console must not have: absl-format log lines,
  library INFO, TensorFlow's C++ notices, JAX's backend probing, tracebacks."""
  return [l for l in console.splitlines()
          if _ABSL_LINE.match(l) or "INFO" in l or "oneDNN" in l or
          "tensorflow/core" in l or "local_xla/" in l or "cuda" in l.lower()
          or "Traceback" in l or
          "Unable to initialize backend" in l or "xla_bridge" in l]


def assert_error_first(proc) -> str:
  """A failing command: exit 1 or 2, its first line is one `error:` line."""
  assert proc.returncode in (1, 2), (proc.returncode, proc.stdout,
                                     proc.stderr[-3000:])
  lines = (proc.stderr or "").strip().splitlines()
  assert lines and lines[0].startswith("error:"), proc.stderr[-3000:]
  assert not proc.stdout.strip(), proc.stdout[-3000:]
  assert len(error_lines(proc.stderr)) == 1, proc.stderr[-3000:]
  assert not noisy_lines(proc.stderr), proc.stderr[-3000:]
  return lines[0]


@contextlib.contextmanager
def count_compiles(fun_name: str | None = None):
  """Counts XLA compilations inside the block: `with count_compiles() as n:`.

  `fun_name`: count only those of this function (e.g. 'jit(train_step)').
  """
  counter = [0]

  def listener(event, duration_secs, **kwargs):
    del duration_secs
    if (event == "/jax/core/compile/backend_compile_duration" and
        fun_name in (None, kwargs.get("fun_name"))):
      counter[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def build_step(config, mesh, total_steps: int = 100,
               steps_per_epoch: int = 10):
  """A fresh train state and the (unjitted) train step, as the trainer builds
  them for a run of `total_steps` steps of `steps_per_epoch`-step epochs."""
  method = methods.get(config.method)
  model = method.make_network(config)
  tx, lr_fn = optim.build_optimizer(config, total_steps, steps_per_epoch)
  tau_fn = (optim.tau_schedule(config.tau_base, total_steps)
            if method.HAS_TARGET else None)
  state = train_state.create(config, model, tx, mesh, method.HAS_TARGET)
  return state, step_lib.make_train_step(config, model, tx, lr_fn, tau_fn)
