r"""The driver of benchmarks/gpu_suite.sh: two stages inside one deadline.

  python benchmarks/gpu_suite.py --budget_s=530 --data=.data/cifar10.npz

1. Step throughput (benchmarks/step_throughput.py, bfloat16): ResNet-18
   CIFAR at the CIFAR config's batch (timed: it sizes stage 2; at most
   150 s), then ResNet-50 224 px at per-device batch 128 and 256 (img/s,
   supervised baseline, MFU, FLOPs, memory). Stage 1 comes first: it may use
   all the budget but `cifar_min_seconds`.
2. CIFAR-10 BYOL ResNet-18 through `python -m byol_jax.train` with
   `configs/byol_cifar10.py:source=npz` in bfloat16 (the dtype stage 1
   timed), for as many steps as the measured step time fits before the
   deadline (`plan`: `--config.total_steps`, so the learning-rate and EMA
   schedules end with the run), with the kNN monitor every few epochs
   (`--config.eval_every_steps`). If it is still running at the deadline
   less the final reserve, it gets SIGTERM, saves and exits with 143:
   "stopped_on_time".

Everything goes to RESULTS_ROOT/gpu_suite_<UTC date>_<device>/ (at most 8
files: suite.json, throughput_<i>.json, throughput.log, cifar_train.log,
cifar_metrics.jsonl, cifar_config.json); the trainer's checkpoints stay in
--workdir_root. `--tiny` is the CPU dry run of the same code: the tiny config
timed at batch 8, then up to 8 steps of configs/tiny.py.

This process never initialises JAX's backend (it would take the GPU's memory
from the stages): the device is probed in a subprocess.
"""
import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import run_info  # benchmarks/run_info.py, beside this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_PREEMPTED = 143  # byol_jax.train: saved after SIGTERM.


@dataclasses.dataclass(frozen=True)
class Mode:
  """What each stage runs, full (GPU) or tiny (CPU dry run)."""
  # step_throughput.py argv lists, each with its own time limit (None: up
  # to the deadline less `cifar_min_seconds`).
  throughput: tuple[tuple[tuple[str, ...], float | None], ...]
  sizing_case: str              # the throughput row that times stage 2's step
  train_config: str             # --config=... of stage 2, {data} filled in
  train_flags: tuple[str, ...]
  max_steps: int                # stage 2 never runs more steps
  evals: int                    # kNN evaluations in a run of max length
  eval_seconds: float           # reserve per evaluation
  startup_seconds: float        # data loading and the like, before compiling
  final_seconds: float          # the final save and evaluation (or SIGTERM)
  cifar_min_seconds: float      # stage 1 leaves stage 2 at least this


def full_mode(devices: int) -> Mode:
  per_device = max(256 // devices, 1)
  return Mode(
      throughput=((("--cases=r18_cifar", f"--per_device_batch={per_device}",
                    "--steps=20", "--warmup=3"), 150.0),
                  (("--cases=r50_224", "--per_device_batch=128,256",
                    "--steps=20", "--warmup=3"), None)),
      sizing_case="r18_cifar",
      train_config="configs/byol_cifar10.py:source=npz,path={data}",
      train_flags=("--config.model.dtype=bfloat16",
                   "--config.log_every_steps=100",
                   "--config.checkpoint_every_steps=100000"),
      max_steps=1_000_000, evals=4, eval_seconds=20.0, startup_seconds=40.0,
      final_seconds=45.0, cifar_min_seconds=120.0)


def tiny_mode() -> Mode:
  return Mode(
      throughput=((("--cases=tiny", "--per_device_batch=8", "--steps=3",
                    "--warmup=1"), None),),
      sizing_case="tiny",
      train_config="configs/tiny.py:batch=8,path={data}",
      train_flags=("--config.model.dtype=bfloat16",
                   "--config.log_every_steps=5",
                   "--config.checkpoint_every_steps=100000"),
      max_steps=8, evals=1, eval_seconds=5.0, startup_seconds=10.0,
      final_seconds=20.0, cifar_min_seconds=60.0)


def plan(remaining_s: float, step_seconds: float | None,
         compile_seconds: float | None, steps_per_epoch: int,
         mode: Mode) -> dict:
  """Steps of stage 2 that fit in `remaining_s`, and its evaluation period.

  The time left after start-up (data, 2x the step's measured compilation),
  the evaluations and the final save, divided by 1.25x the measured step
  time (the trainer's own data step runs beside it). Without a measured step
  (stage 1 failed), `max_steps`: the deadline's SIGTERM then ends the run.

  Args:
    remaining_s: seconds until the deadline.
    step_seconds: the timed train step of the same config and batch.
    compile_seconds: its compilation time.
    steps_per_epoch: of the training set at the run's batch.
    mode: the reserves and limits.

  Returns:
    dict(total_steps, eval_every_steps, sizing), total_steps 0 when nothing
    fits.
  """
  if not step_seconds:
    steps, sizing = mode.max_steps, "sigterm"
  else:
    reserve = (mode.startup_seconds + 2 * (compile_seconds or 0.0) +
               mode.evals * mode.eval_seconds + mode.final_seconds)
    steps = int(max(remaining_s - reserve, 0) / (1.25 * step_seconds))
    steps, sizing = min(steps, mode.max_steps), "measured_step_time"
  every = max(steps // mode.evals, 1)
  if every >= steps_per_epoch:  # Whole epochs when a period spans one.
    every = every // steps_per_epoch * steps_per_epoch
  return dict(total_steps=steps, eval_every_steps=every, sizing=sizing)


def run_stage(name: str, argv: list[str], log_path: str, stop_at: float,
              grace_s: float) -> dict:
  """Runs argv (output appended to log_path); SIGTERM at `stop_at`.

  Returns:
    dict(name, command, seconds, returncode, status, sigterm_sent): status
    'ok' (exit 0), 'stopped_on_time' (exit 143 after the SIGTERM: the
    trainer saved), 'stopped_at_limit' (another exit after it: a throughput
    stage keeps the cases it finished), 'killed' (still running `grace_s`
    after it), or 'failed' (it ended on its own with an error).
  """
  start = time.time()
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env=_env())
    terminated = killed = False
    try:
      proc.wait(timeout=max(stop_at - time.time(), 1.0))
    except subprocess.TimeoutExpired:
      terminated = True
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=grace_s)
      except subprocess.TimeoutExpired:
        killed = True
        proc.kill()
        proc.wait()
  code = proc.returncode
  if code == 0:
    status = "ok"
  elif terminated and code == EXIT_PREEMPTED:
    status = "stopped_on_time"
  elif killed:
    status = "killed"
  elif terminated:
    status = "stopped_at_limit"  # Ended by the SIGTERM, without saving.
  else:
    status = "failed"
  print(f"[{name}] {status} (exit {code}) after {time.time() - start:.0f} s",
        flush=True)
  return dict(name=name, command=" ".join(argv), returncode=code,
              seconds=round(time.time() - start, 1), status=status,
              sigterm_sent=terminated)


def _env() -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # One JAX process at a time holds the GPU: let it take more than the
  # default 75% (ResNet-50 at batch 256 on an 80 GB H100).
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  return env


def probe_device(python: str) -> dict:
  """Device kind, platform and count, from a subprocess (see module doc)."""
  out = subprocess.run(
      [python, "-c", "import jax, json; d = jax.devices(); print(json.dumps("
       "dict(kind=d[0].device_kind, platform=d[0].platform, count=len(d))))"],
      cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
  if out.returncode:
    raise SystemExit(f"error: JAX cannot start here: "
                     f"{out.stderr.strip().splitlines()[-1:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _read_jsonl(path: str) -> list[dict]:
  try:
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError):
    return []


def _num_train(data: str) -> int:
  with np.load(data) as d:
    return int(len(d["train_offsets"]) - 1)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="the CPU dry run")
  p.add_argument("--data", default="", help="CIFAR-10 .npz (default: "
                 ".data/cifar10.npz, else ../shared/datasets/"
                 "cifar10_small.npz)")
  p.add_argument("--budget_s", type=float, default=0,
                 help="seconds from --start_time to the deadline "
                 "(default 530, --tiny 170)")
  p.add_argument("--start_time", type=float, default=0,
                 help="unix time the suite started (default: now)")
  p.add_argument("--results_root",
                 default=os.path.join(REPO, "benchmarks", "results"))
  p.add_argument("--workdir_root", default="",
                 help="where the trainer's workdir goes (default: $TMPDIR)")
  p.add_argument("--python", default=sys.executable)
  args = p.parse_args(argv)
  start = args.start_time or time.time()
  deadline = start + (args.budget_s or (170 if args.tiny else 530))
  data = args.data or next(
      (d for d in (os.path.join(REPO, ".data", "cifar10.npz"),
                   os.path.join(REPO, "..", "shared", "datasets",
                                "cifar10_small.npz")) if os.path.isfile(d)),
      "")
  if not os.path.isfile(data):
    raise SystemExit("error: no CIFAR-10 .npz: run benchmarks/gpu_suite.sh "
                     "--prepare, or pass --data=PATH.")
  data = os.path.abspath(data)

  device = probe_device(args.python)
  mode = tiny_mode() if args.tiny else full_mode(device["count"])
  date = datetime.datetime.now(datetime.timezone.utc)
  name = (f"{'suite_tiny' if args.tiny else 'gpu_suite'}_"
          f"{date:%Y%m%d-%H%M%S}_{_slug(device['kind'])}")
  run_dir = os.path.join(args.results_root, name)
  os.makedirs(run_dir)
  print(f"gpu_suite: {device['kind']} x{device['count']}, deadline in "
        f"{deadline - time.time():.0f} s -> {run_dir}", flush=True)

  # --- Stage 1: step throughput, first in priority: it may use all but
  # `cifar_min_seconds` of the budget. A stage stopped at its limit keeps
  # the cases it finished (step_throughput writes after each).
  stages, rows = [], []
  log = os.path.join(run_dir, "throughput.log")
  for i, (flags, limit) in enumerate(mode.throughput):
    out = os.path.join(run_dir, f"throughput_{i}.json")
    stop_at = deadline - mode.cifar_min_seconds
    if limit:
      stop_at = min(stop_at, time.time() + limit)
    stages.append(run_stage(
        f"throughput {' '.join(flags)}",
        [args.python, "benchmarks/step_throughput.py", *flags,
         f"--output={out}"], log, stop_at, grace_s=10))
    rows += (_read_json(out) or {}).get("results", [])

  # --- Stage 2: CIFAR-10 BYOL, sized to the deadline.
  sizing_row = next((r for r in rows if r["case"] == mode.sizing_case
                     and r.get("step_seconds")), None)
  num_train = _num_train(data)
  global_batch = sizing_row["global_batch"] if sizing_row else 256
  steps_per_epoch = max(num_train // global_batch, 1)
  schedule = plan(deadline - time.time(),
                  sizing_row and sizing_row["step_seconds"],
                  sizing_row and sizing_row["compile_seconds"],
                  steps_per_epoch, mode)
  workdir = os.path.join(args.workdir_root or os.environ.get("TMPDIR", "/tmp"),
                         "byol_gpu_suite", name)
  cifar = dict(config=mode.train_config.format(data=data), data=data,
               num_train=num_train, steps_per_epoch=steps_per_epoch,
               workdir=workdir, **schedule)
  if schedule["total_steps"] > 0:
    train = run_stage(
        "cifar10 byol", [
            args.python, "-m", "byol_jax.train",
            f"--config={cifar['config']}", f"--workdir={workdir}",
            f"--config.total_steps={schedule['total_steps']}",
            f"--config.eval_every_steps={schedule['eval_every_steps']}",
            *mode.train_flags],
        os.path.join(run_dir, "cifar_train.log"),
        deadline - mode.final_seconds, grace_s=mode.final_seconds)
    stages.append(train)
    cifar["status"] = train["status"]
    for f in ("metrics.jsonl", "config.json"):
      if os.path.isfile(os.path.join(workdir, f)):
        shutil.copy(os.path.join(workdir, f), os.path.join(run_dir,
                                                           f"cifar_{f}"))
  else:
    cifar["status"] = "skipped: no time left"
  metrics = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  cifar["evals"] = [m for m in metrics if any(k.startswith("eval/")
                                              for k in m)]
  train_lines = [m for m in metrics if "loss" in m]
  cifar["last_train"] = train_lines[-1] if train_lines else None
  cifar["final_step"] = max((m["step"] for m in metrics), default=0)

  elapsed = time.time() - start
  ok = (all(s["status"] == "ok" for s in stages
            if s["name"].startswith("throughput")) and
        cifar["status"] in ("ok", "stopped_on_time"))
  report = dict(
      suite="gpu_suite", tiny=args.tiny, date=date.isoformat(),
      commit=run_info.commit(), versions=run_info.versions(),
      device=device, budget_s=deadline - start, elapsed_s=round(elapsed, 1),
      within_budget=elapsed <= deadline - start, ok=ok, stages=stages,
      throughput=[_summary(r) for r in rows], cifar=cifar)
  with open(os.path.join(run_dir, "suite.json"), "w") as f:
    json.dump(report, f, indent=2)
  _print(report)
  return 0 if ok else 1


def _summary(r: dict) -> dict:
  if "error" in r:
    return dict(r)
  keys = ("case", "image_size", "dtype", "per_device_batch", "global_batch",
          "images_per_sec", "images_per_sec_per_device",
          "supervised_images_per_sec", "ratio_to_supervised", "mfu",
          "mfu_xla", "step_forwards", "forward_flops_per_image", "step_flops")
  out = {k: r.get(k) for k in keys}
  out["peak_bytes_estimate"] = r["memory"].get("peak_bytes_estimate")
  return out


def _print(report: dict) -> None:
  print(f"{'case':10} {'b/dev':>5} {'img/s':>9} {'sup img/s':>9} {'MFU %':>6} "
        f"{'fwds':>5} {'mem GiB':>7}")
  for r in report["throughput"]:
    if "error" in r:
      print(f"{r['case'][:10]:10} {r['per_device_batch']:>5} error: "
            f"{r['error'][:80]}")
      continue
    print(f"{r['case'][:10]:10} {r['per_device_batch']:>5} "
          f"{run_info.fmt(r['images_per_sec'], 1, 1):>9} "
          f"{run_info.fmt(r['supervised_images_per_sec'], 1, 1):>9} "
          f"{run_info.fmt(r['mfu'], 0.01, 1):>6} "
          f"{run_info.fmt(r['step_forwards']):>5} "
          f"{run_info.fmt(r['peak_bytes_estimate'], 2**30):>7}")
  c = report["cifar"]
  knn = [(e["step"], e.get("eval/knn_top1")) for e in c["evals"]]
  print(f"cifar10 byol: {c['status']}, step {c['final_step']}/"
        f"{c['total_steps']} (eval every {c['eval_every_steps']}), "
        f"kNN top-1 {knn}")
  print(f"suite {'ok' if report['ok'] else 'FAILED'} in "
        f"{report['elapsed_s']:.0f} s of {report['budget_s']:.0f}")


if __name__ == "__main__":
  sys.exit(main())
