r"""Throughput, FLOPs and memory of the train step users run.

  python benchmarks/step_throughput.py --cases=r50_224 \
      --per_device_batch=128,256
  python benchmarks/step_throughput.py --analyze_only       # no timing
  python benchmarks/step_throughput.py --timed=r18_cifar@64 --steps=3

A case is a real config file (`CASES`, or `configs/NAME.py[:ARG]`) at a
per-device batch, in `--dtype` (default bfloat16; `config`: the file's). The
step is the trainer's: the config's own device-side augmentations (blur
wherever the config has it), `step.make_train_step` + `step.jit_train_step`
on `sharding.make_mesh()`, state from `train_state.create`, optimizer from
`optim.build_optimizer`, a device-resident uint8 batch of the image size.

From the compiled programs alone (so on CPU too), per device:
- `step_flops`: XLA's cost analysis ('flops') of the BYOL step, against 8
  encoder forwards per image (2 views x (forward + backward ~ 3 forwards) +
  2 target forwards), the forward's FLOPs from a forward-only jit of the
  encoder (inference batch-norm) on the same batch: `step_forwards` (the step
  in forwards per image; heads, augmentations and optimizer included) and
  `step_flops_over_8_forwards`. The same for the supervised baseline
  (benchmarks/supervised.py, ~3 forwards): `supervised_forwards`.
- `memory`: the fields of `compiled.memory_analysis()` and
  `peak_bytes_estimate = argument + output - alias + temp` (the donated state
  is aliased: outputs reuse its buffers).
Timed cases (`--timed`, default all, none with `--analyze_only`) add img/s of
the BYOL and supervised steps on the same batch, their ratio, and MFU =
achieved FLOP/s / peak dense bf16 FLOP/s (`PEAK_FLOPS`): `mfu` with 8
forwards per image, `mfu_xla` with the compiled step's FLOPs.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from byol_jax import data  # noqa: E402
from byol_jax.core import methods  # noqa: E402
from byol_jax.core import optim  # noqa: E402
from byol_jax.core import sharding  # noqa: E402
from byol_jax.core import step as step_lib  # noqa: E402
from byol_jax.core import train_state  # noqa: E402
from byol_jax.core.methods import network  # noqa: E402
import run_info  # noqa: E402  (benchmarks/run_info.py, beside this file)
import supervised  # noqa: E402  (benchmarks/supervised.py)

# The cases by name: a config file and its ':ARG'.
CASES = {
    "r18_cifar": "configs/byol_cifar10.py",   # ResNet-18, CIFAR stem, 32 px
    "r50_224": "configs/byol_r50.py",          # ResNet-50, 224 px
    "tiny": "configs/tiny.py",                 # 8-filter ResNet-18, 32 px
}

# Dense bf16 peak FLOP/s per device, by device_kind prefix (longest first).
PEAK_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12, "TPU v3": 123e12 / 2, "TPU v4": 275e12 / 2,
    "TPU v5 lite": 197e12, "TPU v5p": 459e12 / 2, "TPU v5": 459e12 / 2,
    "TPU v6 lite": 918e12,
}

CPU_NOTE = ("CPU run: step times, images/s and MFU on CPU are not "
            "representative of accelerators; the FLOP and memory figures "
            "(XLA cost and memory analysis of the compiled programs) are the "
            "point of this file.")


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of `device_kind` (None: unknown)."""
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


def load_config(spec: str):
  """`get_config(arg)` of a case name or of 'path/to/config.py[:ARG]'."""
  path = CASES.get(spec, spec)
  path, _, arg = path.partition(":")
  if not os.path.isabs(path):
    path = os.path.join(REPO, path)
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def make_config(spec: str, per_device_batch: int, dtype: str):
  """The case's config at `per_device_batch` on every device of the mesh."""
  config = load_config(spec)
  if config.data.num_classes < 0:  # Classes from the data (tiny's .npz).
    config = data.resolve(config)
  with config.unlocked():
    config.batch_size = per_device_batch * jax.device_count()
    config.total_steps = 1000   # Schedules need a length; any will do.
    if dtype != "config":
      config.model.dtype = dtype
  return config


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost or {}


def _flops(compiled) -> float | None:
  flops = _cost(compiled).get("flops")
  return float(flops) if flops and flops > 0 else None


def memory_figures(compiled) -> dict:
  """Every integer field of `compiled.memory_analysis()`, and the estimate."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  fields = {name: int(getattr(stats, name)) for name in dir(stats)
            if name.endswith("_in_bytes")}
  fields["peak_bytes_estimate"] = (
      fields["argument_size_in_bytes"] + fields["output_size_in_bytes"] -
      fields["alias_size_in_bytes"] + fields["temp_size_in_bytes"])
  return fields


def forward_flops_per_image(config, state, per_device_batch: int
                            ) -> float | None:
  """XLA's FLOPs of one encoder forward (inference BN) per image."""
  s = config.data.image_size
  encoder = network.make_encoder(config)
  variables = {"params": state.params["encoder"],
               "batch_stats": state.batch_stats["encoder"]}
  variables = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables)
  x = jax.ShapeDtypeStruct((per_device_batch, s, s, 3), jnp.float32)
  compiled = jax.jit(lambda v, x: encoder.apply(v, x, train=False)).lower(
      variables, x).compile()
  flops = _flops(compiled)
  return flops / per_device_batch if flops else None


def abstract_batch(config, mesh) -> dict:
  """Shapes of the global uint8 batch, sharded like the trainer's."""
  b, s = config.batch_size, config.data.image_size
  sh = sharding.batch_sharding(mesh)
  return dict(view1=jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=sh),
              view2=jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=sh),
              label=jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh))


def random_batch(config, mesh) -> dict:
  """A device-resident uint8 batch of the config's image size."""
  b, s = config.batch_size, config.data.image_size
  rng = np.random.default_rng(0)
  return sharding.global_batch(dict(
      view1=rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
      view2=rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
      label=rng.integers(0, config.data.num_classes, (b,), dtype=np.int32)),
      mesh)


def time_step(fn, state, batch, steps: int, warmup: int) -> float:
  """Seconds per step of `state = fn(state, batch)[0]`, after warm-up."""
  for _ in range(warmup):
    state, metrics = fn(state, batch)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps


# --- One case. --------------------------------------------------------------
def bench_case(spec: str, per_device_batch: int, dtype: str, timed: bool,
               steps: int, warmup: int) -> dict:
  """Analyses (and, if `timed`, timings) of one config at one batch."""
  mesh = sharding.make_mesh()
  n = mesh.devices.size
  config = make_config(spec, per_device_batch, dtype)
  method = methods.get(config.method)
  model = method.make_network(config)
  tx, lr_fn = optim.build_optimizer(config, config.total_steps, 100)
  tau_fn = (optim.tau_schedule(config.tau_base, config.total_steps)
            if method.HAS_TARGET else None)
  abstract = train_state.abstract(config, model, tx, mesh, method.HAS_TARGET)
  batch_shapes = abstract_batch(config, mesh)

  t0 = time.perf_counter()
  step = step_lib.jit_train_step(
      step_lib.make_train_step(config, model, tx, lr_fn, tau_fn), mesh)
  compiled = step.lower(abstract, batch_shapes).compile()
  compile_seconds = time.perf_counter() - t0
  fwd = forward_flops_per_image(config, abstract, per_device_batch)
  step_flops = _flops(compiled)

  sup_step, sup_init = supervised.make_step(config, mesh)
  sup_compiled = sup_step.lower(jax.eval_shape(sup_init),
                                batch_shapes).compile()
  sup_flops = _flops(sup_compiled)

  def ratio(flops, forwards):
    return flops / (forwards * fwd * per_device_batch) if (
        flops and fwd) else None

  row = dict(
      case=spec, config=CASES.get(spec, spec), method=config.method,
      depth=config.model.depth, width=config.model.width,
      num_filters=config.model.num_filters, stem=config.model.stem,
      image_size=config.data.image_size, dtype=config.model.dtype,
      blur=[config.augment.view1.blur, config.augment.view2.blur],
      solarize=[config.augment.view1.solarize, config.augment.view2.solarize],
      per_device_batch=per_device_batch, global_batch=config.batch_size,
      compile_seconds=compile_seconds,
      forward_flops_per_image=fwd,
      step_flops=step_flops,
      step_flops_per_image=(step_flops / per_device_batch if step_flops
                            else None),
      step_forwards=ratio(step_flops, 1),
      step_flops_over_8_forwards=ratio(step_flops, 8),
      supervised_step_flops=sup_flops,
      supervised_forwards=ratio(sup_flops, 1),
      supervised_flops_over_3_forwards=ratio(sup_flops, 3),
      memory=memory_figures(compiled),
      supervised_memory=memory_figures(sup_compiled))
  if not timed:
    return row

  state = train_state.create(config, model, tx, mesh, method.HAS_TARGET)
  batch = random_batch(config, mesh)
  ssl_seconds = time_step(compiled, state, batch, steps, warmup)
  del state
  sup_seconds = time_step(sup_compiled, sup_init(), batch, steps, warmup)
  ips = config.batch_size / ssl_seconds
  sup_ips = config.batch_size / sup_seconds
  peak = peak_flops(jax.devices()[0].device_kind)
  row.update(
      steps=steps, warmup=warmup, step_seconds=ssl_seconds,
      images_per_sec=ips, images_per_sec_per_device=ips / n,
      supervised_step_seconds=sup_seconds, supervised_images_per_sec=sup_ips,
      ratio_to_supervised=ips / sup_ips,
      peak_flops_per_device=peak,
      mfu=(ips / n * 8 * fwd / peak) if (peak and fwd) else None,
      mfu_xla=(step_flops / ssl_seconds / peak) if (peak and step_flops)
      else None)
  return row


# --- The report. ------------------------------------------------------------
def parse_timed(value: str, analyze_only: bool) -> set | None:
  """None: time every case; else the set of (case, batch) to time."""
  if analyze_only or value == "none":
    return set()
  if value == "all":
    return None
  timed = set()
  for item in value.split(","):
    case, sep, batch = item.partition("@")
    if not sep or not batch.isdigit():
      raise SystemExit(f"error: --timed item {item!r} is not CASE@BATCH "
                       "(e.g. r18_cifar@64); or give all or none.")
    timed.add((case, int(batch)))
  return timed


def print_table(report: dict) -> None:
  print(f"device: {report['device_kind']} x{report['device_count']}  "
        f"commit {report['commit']}  load {report['load_average']['start']}")
  print(f"{'case':10} {'px':>4} {'dtype':9} {'b/dev':>5} {'fwd GF':>7} "
        f"{'step GF':>8} {'fwds':>6} {'sup fwds':>8} {'mem GiB':>8} "
        f"{'img/s':>9} {'sup img/s':>9} {'ratio':>6} {'MFU':>6}")
  for r in report["results"]:
    if "error" in r:
      print(f"{r['case'][:10]:10} {'':>4} {'':9} {r['per_device_batch']:>5} "
            f"error: {r['error'][:80]}")
      continue
    mfu = r.get("mfu")
    print(f"{r['case'][:10]:10} {r['image_size']:>4} {r['dtype']:9} "
          f"{r['per_device_batch']:>5} "
          f"{run_info.fmt(r['forward_flops_per_image'], 1e9, 3):>7} "
          f"{run_info.fmt(r['step_flops_per_image'], 1e9, 3):>8} "
          f"{run_info.fmt(r['step_forwards']):>6} "
          f"{run_info.fmt(r['supervised_forwards']):>8} "
          f"{run_info.fmt(r['memory'].get('peak_bytes_estimate'), 2**30):>8} "
          f"{run_info.fmt(r.get('images_per_sec'), 1, 1):>9} "
          f"{run_info.fmt(r.get('supervised_images_per_sec'), 1, 1):>9} "
          f"{run_info.fmt(r.get('ratio_to_supervised'), 1, 3):>6} "
          f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>6}")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", default="r18_cifar,r50_224",
                 help=f"comma list of {sorted(CASES)} or CONFIG.py[:ARG] "
                 "(no commas in ARG)")
  p.add_argument("--per_device_batch", default="64,128,256")
  p.add_argument("--dtype", default="bfloat16",
                 help="compute dtype, or 'config' for the config file's")
  p.add_argument("--analyze_only", action="store_true",
                 help="compile and analyse only: no step is run")
  p.add_argument("--timed", default="all",
                 help="all, none, or CASE@BATCH,... to time (others: "
                 "analyses only)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--output", default="",
                 help="JSON path (default: benchmarks/results/"
                 "step_throughput_<platform>_<cases>.json)")
  args = p.parse_args(argv)
  cases = [c for c in args.cases.split(",") if c]
  batches = [int(b) for b in args.per_device_batch.split(",") if b]
  timed = parse_timed(args.timed, args.analyze_only)

  dev = jax.devices()[0]
  out = args.output or os.path.join(
      REPO, "benchmarks", "results",
      f"step_throughput_{dev.platform}_{'_'.join(map(_slug, cases))}.json")
  report = dict(
      benchmark="step_throughput",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      commit=run_info.commit(), device_kind=dev.device_kind,
      platform=dev.platform,
      device_count=jax.device_count(), process_count=jax.process_count(),
      host=platform.node(), cpu_count=os.cpu_count(),
      load_average=dict(start=[round(x, 2) for x in os.getloadavg()]),
      versions=run_info.versions(), command=" ".join(sys.argv),
      conventions=dict(
          flops="XLA cost analysis 'flops' of the compiled program, per "
                "device; forward = encoder only, batch-norm in inference "
                "mode, per image",
          step_forwards="step_flops / (forward_flops_per_image * "
                        "per_device_batch); step_flops_over_8_forwards = "
                        "step_forwards / 8",
          memory="compiled.memory_analysis() per device; "
                 "peak_bytes_estimate = argument + output - alias + temp",
          mfu="images/s/device * 8 * forward_flops_per_image / peak; "
              "mfu_xla = step_flops / step_seconds / peak"),
      results=[])
  if dev.platform == "cpu":
    report["note"] = CPU_NOTE
  for case in cases:
    for b in batches:
      is_timed = timed is None or (case, b) in timed
      print(f"{case} batch {b}/device: compiling"
            f"{' and timing' if is_timed else ''}...", flush=True)
      try:
        row = bench_case(case, b, args.dtype, is_timed, args.steps,
                         args.warmup)
      except jax.errors.JaxRuntimeError as e:  # Out of memory, typically.
        row = dict(case=case, per_device_batch=b,
                   error=str(e).strip().splitlines()[0][:500])
        print(f"  failed: {row['error']}", flush=True)
      report["results"].append(row)
      # Written after every case: a stage stopped at its deadline keeps
      # the cases it finished.
      report["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
      _write(report, out)
  print_table(report)
  print(f"wrote {out}")
  return report


def _write(report: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  os.replace(path + ".tmp", path)


def _slug(case: str) -> str:
  name = os.path.splitext(os.path.basename(case.partition(":")[0]))[0]
  return "".join(ch if ch.isalnum() else "_" for ch in name)


if __name__ == "__main__":
  main()
