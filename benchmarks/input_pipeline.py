r"""Input-pipeline throughput: host tf.data two-view crops and device augmentation.

  python benchmarks/input_pipeline.py                     # Imagenette, 224 px
  python benchmarks/input_pipeline.py --size=128 --threads=1,4,16

Measures, on the packed Imagenette JPEGs (../shared/datasets):
- host: two-view samples per second of the tf.data pretraining pipeline
  (fused JPEG decode-and-crop, two random resized crops, bicubic resize to
  --size, uint8 batches), with N threads for each N in --threads; reported in
  total and per thread (= per CPU core when the cores are free);
- device augmentation: `augment.augment_views` (flip, colour jitter, grayscale,
  blur, solarize, normalisation; BYOL's T and T') under jit on the default
  JAX devices;
- device crops: the on-device path's batch function (permutation, gather,
  two random resized crops per image) on the same images kept on the device.

Prints a table and writes benchmarks/results/input_pipeline_<device>.json.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from byol_jax import config_lib  # noqa: E402
from byol_jax import sharding  # noqa: E402
from byol_jax.data import augment  # noqa: E402
from byol_jax.data import device  # noqa: E402
from byol_jax.data import sources  # noqa: E402

DEFAULT_NPZ = os.path.join(REPO, "..", "shared", "datasets",
                           "imagenette_small.npz")
TARGET_PER_CORE = 125.0


def _config(npz: str, size: int, batch: int, threads: int):
  c = config_lib.base_config()
  c.batch_size = batch
  c.data.source = "npz"
  c.data.path = npz
  c.data.train_split = "train"
  c.data.image_size = size
  c.data.num_parallel_calls = threads
  return c


def _rate(fn, batch: int, warmup: int, steps: int, trials: int
          ) -> tuple[float, float]:
  """Medians over trials of samples per wall second and per CPU second.

  CPU seconds are this process's (all threads, user + system), so samples
  per CPU second is the throughput of one fully used core, whatever else
  runs on the machine.
  """
  for _ in range(warmup):
    fn()
  rates, cpu_rates = [], []
  for _ in range(trials):
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
      fn()
    rates.append(steps * batch / (time.perf_counter() - start))
    cpu_rates.append(steps * batch / max(time.process_time() - cpu, 1e-9))
  return statistics.median(rates), statistics.median(cpu_rates)


def bench_host(npz, size, batch, threads, steps, trials):
  from byol_jax.data import host  # pylint: disable=g-import-not-at-top
  ds, _ = host.pretrain_dataset(_config(npz, size, batch, threads),
                                process_index=0, process_count=1)
  it = ds.as_numpy_iterator()
  return _rate(lambda: next(it), batch, warmup=3, steps=steps, trials=trials)


def bench_device_augment(size, batch, steps, trials):
  cfg = config_lib.base_config().augment
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, size, size, 3),
                                       dtype=np.uint8))
  fn = jax.jit(lambda r, b: augment.augment_views(r, b, cfg))
  batch_dict = dict(view1=images, view2=images)
  key = jax.random.PRNGKey(0)
  return _rate(lambda: jax.block_until_ready(fn(key, batch_dict)), batch,
               warmup=2, steps=steps, trials=trials)[0]


def bench_device_crops(npz, size, batch, steps, trials):
  c = _config(npz, size, batch, -1)
  mesh = sharding.make_mesh()
  images, labels = sources.load_arrays(c.data, "train")
  data = device.DevicePretrainData(c, mesh, images, labels)
  step = iter(range(10**9))
  return _rate(lambda: jax.block_until_ready(data.batch(next(step))), batch,
               warmup=2, steps=steps, trials=trials)[0]


def _git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--npz", default=os.path.normpath(DEFAULT_NPZ))
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--threads", default="",
                 help="comma-separated thread counts (default: 1 and all "
                      "cores)")
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--trials", type=int, default=3)
  p.add_argument("--note", default="")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  args = p.parse_args()

  cores = os.cpu_count() or 1
  threads = ([int(t) for t in args.threads.split(",")] if args.threads
             else sorted({1, cores}))
  load_before = os.getloadavg()
  rows = []
  for n in threads:
    rate, cpu_rate = bench_host(args.npz, args.size, args.batch, n,
                                args.steps, args.trials)
    rows.append(dict(threads=n, two_view_samples_per_s=round(rate, 1),
                     per_thread=round(rate / n, 1),
                     per_cpu_second=round(cpu_rate, 1)))
  dev = jax.devices()
  aug = bench_device_augment(args.size, args.batch, max(4, args.steps // 3),
                             args.trials)
  crops_rate = bench_device_crops(args.npz, args.size, args.batch,
                                  max(4, args.steps // 3), args.trials)
  load_after = os.getloadavg()

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  kind = dev[0].device_kind
  best = max(r["per_cpu_second"] for r in rows)
  result = dict(
      benchmark="input_pipeline",
      dataset=os.path.basename(args.npz), image_size=args.size,
      batch=args.batch, device_kind=kind, device_platform=dev[0].platform,
      device_count=len(dev), jax_version=jax.__version__,
      tf_version=tf.__version__, python=platform.python_version(),
      git_commit=_git_commit(), cpu_cores=cores,
      load_average_before=[round(x, 2) for x in load_before],
      load_average_after=[round(x, 2) for x in load_after],
      host=rows, host_target_per_core=TARGET_PER_CORE,
      host_meets_target=bool(best >= TARGET_PER_CORE),
      device_augment_two_view_samples_per_s=round(aug, 1),
      device_crops_two_view_samples_per_s=round(crops_rate, 1),
      note=args.note,
      time=time.strftime("%Y-%m-%dT%H:%M:%S"))

  print(f"\nInput pipeline, {args.size} px, batch {args.batch}, "
        f"{os.path.basename(args.npz)}; {len(dev)} x {kind}; {cores} CPU cores "
        f"(load average {load_before[0]:.1f} -> {load_after[0]:.1f})")
  print(f"{'stage':<40} {'samples/s':>10} {'per thread':>11} "
        f"{'per CPU-s':>10}")
  for r in rows:
    print(f"{'host tf.data, ' + str(r['threads']) + ' thread(s)':<40} "
          f"{r['two_view_samples_per_s']:>10.1f} {r['per_thread']:>11.1f} "
          f"{r['per_cpu_second']:>10.1f}")
  label = "device augment_views, T and T' (" + dev[0].platform + ")"
  print(f"{label:<40} {aug:>10.1f}")
  print(f"{'device crops, on-device path (' + dev[0].platform + ')':<40} "
        f"{crops_rate:>10.1f}")
  print("(samples = two-view samples; per CPU-s = per second of one busy core)")
  print(f"host target: >= {TARGET_PER_CORE:.0f} per core: "
        f"{'met' if result['host_meets_target'] else 'NOT met'}")

  os.makedirs(args.out, exist_ok=True)
  name = "".join(ch if ch.isalnum() else "_" for ch in kind.lower()).strip("_")
  path = os.path.join(args.out, f"input_pipeline_{name}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
